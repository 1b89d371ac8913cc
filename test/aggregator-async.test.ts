/**
 * Asynchronous mode (FedBuff): the model steps after every bufferSize
 * accepted updates, and an update trained from an older version counts
 * with weight numExamples * (1 + lag)^-exponent.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { after, before, describe, test } from 'node:test';

import { InvalidArgumentError } from 'commander';

import {
  Aggregator,
  ModelStore,
  resolveOptions,
  type RoundClosedEvent,
} from '../aggregator/index.ts';
import { STALENESS_WEIGHT_SCALE } from '../aggregator/async-options.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import type { RunningBroker } from '../broker/index.ts';
import { asyncBufferOfFlags } from '../protocol/cli-arguments.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  encodeModelUpdate,
  type RoundTask,
} from '../protocol/index.ts';
import {
  TestVehicle,
  buildUpdate,
  createWorkspace,
  loadRealImages,
  startTestBroker,
  testOptions,
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';

let images: RealImages;

before(async () => {
  images = await loadRealImages();
});

function hasCode(code: string, pattern?: RegExp) {
  return (err: unknown): boolean =>
    err instanceof FleetError &&
    err.code === code &&
    (pattern === undefined || pattern.test(err.message));
}

/** Largest |weights[name] - reference[name] - shift| over one tensor. */
function distanceFrom(
  next: Float32Array,
  reference: Float32Array,
  shift: number,
): number {
  let distance = 0;
  for (let i = 0; i < next.length; i++) {
    distance = Math.max(distance, Math.abs(next[i] - reference[i] - shift));
  }
  return distance;
}

describe('asynchronous rounds', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let aggregator: Aggregator;
  const vehicles: TestVehicle[] = [];

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace(21);
    for (const id of ['veh-1', 'veh-2', 'veh-3']) {
      vehicles.push(await TestVehicle.connect(broker, id));
    }
  });

  after(async () => {
    await aggregator?.stop();
    for (const vehicle of vehicles) await vehicle.close();
    await broker.close();
    workspace.remove();
  });

  /** Sends a constant update from `vehicle` trained for `task`. */
  function send(
    vehicle: TestVehicle,
    task: RoundTask,
    value: number,
    numExamples: number,
    updateId?: string,
  ) {
    const update = buildUpdate(vehicle.id, task, {
      numExamples,
      value: () => value,
      overrides: updateId === undefined ? {} : { updateId },
    });
    return vehicle.send(encodeModelUpdate(update));
  }

  test('stale updates count with staleness weight', async () => {
    const options = testOptions(broker, workspace, images, {
      minVehiclesOnline: 3,
      minUpdates: 1,
      maxRounds: 3,
      asyncBuffer: { bufferSize: 2, maxStaleness: 1 },
    });
    aggregator = new Aggregator(options);
    const closedEvents: RoundClosedEvent[] = [];
    aggregator.on('round-closed', (event) => closedEvents.push(event));
    await aggregator.start();
    const [v1, v2, v3] = vehicles;

    const task1 = await v1.nextTask();
    assert.deepEqual(task1.selectedVehicles, []);
    const round1Closed = once(aggregator, 'round-closed');
    assert.equal((await send(v1, task1, 0.01, 10)).status, AckStatus.Accepted);
    assert.equal((await send(v2, task1, 0.02, 30)).status, AckStatus.Accepted);
    await round1Closed;

    // Version 1 = base + FedAvg of the two fresh updates.
    const store = new ModelStore(options.stateDir, MODEL_NAME);
    const base = workspace.baseWeights.get('dense2/bias')!;
    const version1 = store.load(1).weights.get('dense2/bias')!;
    const fresh = (10 * 0.01 + 30 * 0.02) / 40;
    assert.ok(distanceFrom(version1, base, fresh) < 1e-7);

    // Round 2 trains version 1. v3 sends an update for round 1 (lag 1),
    // then v1 a current one: the buffer of 2 is full.
    const task2 = await v1.nextTask();
    assert.equal(task2.round, 2);
    assert.equal(task2.modelVersion, 1);
    const round2Closed = once(aggregator, 'round-closed');
    assert.equal((await send(v3, task1, 0.04, 20)).status, AckStatus.Accepted);
    const duplicate = await send(v3, task1, 0.04, 20);
    assert.equal(duplicate.reasonCode, ErrorCode.DuplicateUpdate);
    assert.equal((await send(v1, task2, 0.01, 10)).status, AckStatus.Accepted);
    const [event2] = (await round2Closed) as [RoundClosedEvent];
    assert.equal(event2.accepted, 2);
    assert.equal(event2.numExamples, 30);

    const staleWeight = Math.round(20 * 2 ** -0.5 * STALENESS_WEIGHT_SCALE);
    const freshWeight = 10 * STALENESS_WEIGHT_SCALE;
    const step =
      (staleWeight * 0.04 + freshWeight * 0.01) / (STALENESS_WEIGHT_SCALE * 30);
    const version2 = store.load(2).weights.get('dense2/bias')!;
    assert.ok(distanceFrom(version2, version1, step) < 1e-7);

    // Round 3 trains version 2: an update from version 0 is 2 versions
    // old, above maxStaleness 1.
    const task3 = await v1.nextTask();
    assert.equal(task3.modelVersion, 2);
    const tooOld = await send(v2, task1, 0.01, 10, 'veh-2-late');
    assert.equal(tooOld.status, AckStatus.Rejected);
    assert.equal(tooOld.reasonCode, ErrorCode.WrongModelVersion);
    assert.match(tooOld.reason, /at most 1 versions old/);
    // A round that was never opened.
    const future = await send(v2, { ...task3, round: 9 }, 0.01, 10, 'veh-2-r9');
    assert.equal(future.reasonCode, ErrorCode.WrongRound);
  });
});

describe('asynchronous options', () => {
  const base = {
    fleetId: 'fleet',
    brokerUrl: 'mqtt://127.0.0.1:1',
    stateDir: '/tmp/unused',
    baseWeightsPath: '/tmp/unused/base.weights.pb',
  };

  test('buffer of 0 is rejected', () => {
    assert.throws(
      () => resolveOptions({ ...base, asyncBuffer: { bufferSize: 0 } }),
      hasCode(ErrorCode.InvalidConfig, /bufferSize is 0/),
    );
  });

  test('negative staleness is rejected', () => {
    assert.throws(
      () =>
        resolveOptions({
          ...base,
          asyncBuffer: { bufferSize: 2, maxStaleness: -1 },
        }),
      hasCode(ErrorCode.InvalidConfig, /maxStaleness is -1/),
    );
  });

  test('robust rule is rejected', () => {
    assert.throws(
      () =>
        resolveOptions({
          ...base,
          aggregation: 'median',
          asyncBuffer: { bufferSize: 2 },
        }),
      hasCode(ErrorCode.InvalidConfig, /aggregation median/),
    );
  });

  test('quorum above buffer is rejected', () => {
    assert.throws(
      () =>
        resolveOptions({
          ...base,
          minUpdates: 3,
          asyncBuffer: { bufferSize: 2 },
        }),
      hasCode(ErrorCode.InvalidConfig, /minUpdates is 3, above/),
    );
  });

  test('staleness flag alone is rejected', () => {
    assert.throws(
      () => asyncBufferOfFlags({ maxStaleness: 2 }),
      (err: unknown) => err instanceof InvalidArgumentError,
    );
    assert.equal(asyncBufferOfFlags({}), undefined);
  });
});

describe('timer limits', () => {
  test('round timeout above 2^31 - 1 ms is rejected', () => {
    assert.throws(
      () =>
        resolveOptions({
          fleetId: 'fleet',
          brokerUrl: 'mqtt://127.0.0.1:1',
          stateDir: '/tmp/unused',
          baseWeightsPath: '/tmp/unused/base.weights.pb',
          roundTimeoutMs: 2 ** 31,
        }),
      hasCode(ErrorCode.InvalidConfig, /roundTimeoutMs is 2147483648/),
    );
  });
});
