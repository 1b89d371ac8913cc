import assert from 'node:assert/strict';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import {
  Aggregator,
  type RoundClosedEvent,
  type RoundFailedEvent,
} from '../aggregator/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  encodeModelUpdate,
} from '../protocol/index.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import { connectToBroker } from '../aggregator/connection.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  TestVehicle,
  buildUpdate,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  startTestBroker,
  testOptions,
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';

let images: RealImages;
let broker: RunningBroker;

// Each group gets its own broker, so no retained status leaks across.
before(async () => {
  images = await loadRealImages();
});

/** Creates a debug-level logger that keeps every line as an object. */
function captureLog() {
  const lines: Array<{ level: number; msg: string }> = [];
  const log = pino(
    { level: 'debug' },
    { write: (line: string) => lines.push(JSON.parse(line)) },
  );
  return { log, lines };
}

function isInvalidConfig(option: string) {
  return (err: unknown): boolean =>
    err instanceof FleetError &&
    err.code === ErrorCode.InvalidConfig &&
    err.message.includes(option);
}

describe('aggregator options', () => {
  let workspace: Workspace;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await broker.close();
    workspace.remove();
  });

  test('invalid config rejected at construction', () => {
    const options = testOptions(broker, workspace, images);

    assert.throws(
      () => new Aggregator({ ...options, vehiclesPerRound: 2, minUpdates: 3 }),
      isInvalidConfig('minUpdates'),
    );
    assert.throws(
      () => new Aggregator({ ...options, roundTimeoutMs: 0 }),
      isInvalidConfig('roundTimeoutMs'),
    );
    assert.throws(
      () => new Aggregator({ ...options, trainableLayers: ['dense9'] }),
      isInvalidConfig('trainableLayers'),
    );
    assert.throws(
      () => new Aggregator({ ...options, learningRate: Number.NaN }),
      isInvalidConfig('learningRate'),
    );
    assert.throws(
      () => new Aggregator({ ...options, probeCount: 3 }),
      isInvalidConfig('probeImages'),
    );
    assert.throws(
      () => new Aggregator({ ...options, fleetId: 'a/b' }),
      isInvalidConfig('fleetId'),
    );
    assert.throws(
      () => new Aggregator({ ...options, maxExamplesPerUpdate: 0 }),
      isInvalidConfig('maxExamplesPerUpdate'),
    );
    assert.throws(
      () => new Aggregator({ ...options, maxAbsDeltaValue: Infinity }),
      isInvalidConfig('maxAbsDeltaValue'),
    );
    assert.throws(
      () => new Aggregator({ ...options, maxExamplesPerUpdate: 2 ** 27 }),
      isInvalidConfig('maxExamplesPerUpdate'),
    );
    assert.throws(
      () => new Aggregator({ ...options, maxAbsDeltaValue: 1e6 }),
      isInvalidConfig('maxAbsDeltaValue'),
    );
    assert.equal(new Aggregator(options).options.maxExamplesPerUpdate, 1e6);
    assert.equal(new Aggregator(options).options.maxAbsDeltaValue, 1000);
    assert.throws(
      () => new Aggregator({ ...options, stateDir: '' }),
      TypeError,
    );
  });

  test('missing base weights fail start', async () => {
    const aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        baseWeightsPath: join(workspace.dir, 'missing.weights.pb'),
      }),
    );

    await assert.rejects(
      aggregator.start(),
      isInvalidConfig('missing.weights.pb'),
    );

    await aggregator.stop();
  });
});

describe('aggregator quorum', () => {
  let workspace: Workspace;
  let vehicles: TestVehicle[] = [];
  let aggregator: Aggregator | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await aggregator?.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  });

  test('quorum not met keeps model', async () => {
    vehicles = await Promise.all(
      ['q-1', 'q-2'].map((id) => TestVehicle.connect(broker, id)),
    );
    aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        minVehiclesOnline: 2,
        minUpdates: 2,
        roundTimeoutMs: 1500,
      }),
    );
    const failed = once(aggregator, 'round-failed');
    await aggregator.start();

    const [event] = (await failed) as [RoundFailedEvent];
    assert.equal(event.reasonCode, ErrorCode.QuorumNotMet);
    assert.equal(event.accepted, 0);
    assert.equal(event.modelVersion, 0);
    assert.ok(event.durationMs >= 1400);
    assert.equal(aggregator.currentModelVersion, 0);
    assert.equal(aggregator.currentRound, 1);
  });
});

describe('aggregator restart', () => {
  let workspace: Workspace;
  let vehicle: TestVehicle;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
    vehicle = await TestVehicle.connect(broker, 'restart-veh');
  });

  after(async () => {
    await vehicle.close();
    await broker.close();
    workspace.remove();
  });

  async function runOneRound(): Promise<RoundClosedEvent> {
    const aggregator = new Aggregator(testOptions(broker, workspace, images));
    const closed = once(aggregator, 'round-closed');
    await aggregator.start();
    const task = await vehicle.nextTask();
    const ack = await vehicle.send(
      encodeModelUpdate(buildUpdate(vehicle.id, task)),
    );
    assert.equal(ack.status, AckStatus.Accepted, ack.reason);
    const [event] = (await closed) as [RoundClosedEvent];
    await aggregator.stop();
    return event;
  }

  test('restart resumes round and version', async () => {
    const first = await runOneRound();
    assert.equal(first.round, 1);
    assert.equal(first.modelVersion, 1);

    const second = await runOneRound();
    assert.equal(second.round, 2);
    assert.equal(second.modelVersion, 2);

    const stateDir = join(workspace.dir, 'state');
    const state = JSON.parse(
      readFileSync(join(stateDir, 'state.json'), 'utf8'),
    );
    assert.deepEqual(state, { round: 2, modelVersion: 2 });
    const modelDir = join(stateDir, 'models', MODEL_NAME);
    for (const file of [
      'v0.onnx',
      'v1.onnx',
      'v2.onnx',
      'v2.weights.pb',
      'v2.json',
    ]) {
      assert.ok(existsSync(join(modelDir, file)), `${file} missing`);
    }
    const manifest = JSON.parse(
      readFileSync(join(modelDir, 'v2.json'), 'utf8'),
    );
    assert.equal(manifest.parentVersion, 1);
    assert.equal(manifest.round, 2);
    assert.equal(manifest.numVehicles, 1);
    const release = await fetchRetainedRelease(broker);
    assert.equal(release.version, 2);
    assert.equal(release.sha256, manifest.sha256);
  });
});

describe('aggregator deadline and export check', () => {
  let workspace: Workspace;
  let vehicles: TestVehicle[] = [];

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
    vehicles = await Promise.all(
      ['d-1', 'd-2'].map((id) => TestVehicle.connect(broker, id)),
    );
  });

  after(async () => {
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker.close();
    workspace.remove();
  });

  test('deadline closes round with quorum', async () => {
    const aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        minVehiclesOnline: 2,
        minUpdates: 1,
        roundTimeoutMs: 1500,
      }),
    );
    const closed = once(aggregator, 'round-closed');
    await aggregator.start();
    const task = await vehicles[0].nextTask();
    const update = buildUpdate('d-1', task, { numExamples: 5 });
    const ack = await vehicles[0].send(encodeModelUpdate(update));

    const [event] = (await closed) as [RoundClosedEvent];
    await aggregator.stop();

    assert.equal(ack.status, AckStatus.Accepted);
    assert.deepEqual(event.selected, ['d-1', 'd-2']);
    assert.equal(event.accepted, 1);
    assert.equal(event.numExamples, 5);
    assert.equal(event.modelVersion, 1);
    assert.ok(event.durationMs >= 1400);
  });

  test('export mismatch keeps previous model', async () => {
    // A tolerance below float32 rounding makes every export check fail.
    // Version 1 is already stored, so only the new version is checked.
    const aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        minVehiclesOnline: 2,
        exportToleranceAbs: 1e-30,
      }),
    );
    const failed = once(aggregator, 'round-failed');
    await aggregator.start();
    const task = await vehicles[0].nextTask();
    await Promise.all(
      vehicles.map((vehicle) =>
        vehicle.send(encodeModelUpdate(buildUpdate(vehicle.id, task))),
      ),
    );

    const [event] = (await failed) as [RoundFailedEvent];
    await aggregator.stop();

    assert.equal(task.round, 2);
    assert.equal(event.reasonCode, ErrorCode.ExportMismatch);
    assert.equal(event.accepted, 2);
    assert.equal(event.modelVersion, 1);
    assert.equal(aggregator.currentModelVersion, 1);
    const stateDir = join(workspace.dir, 'state');
    const state = JSON.parse(
      readFileSync(join(stateDir, 'state.json'), 'utf8'),
    );
    assert.deepEqual(state, { round: 2, modelVersion: 1 });
    assert.equal(
      existsSync(join(stateDir, 'models', MODEL_NAME, 'v2.json')),
      false,
    );
    assert.equal((await fetchRetainedRelease(broker)).version, 1);
  });
});

describe('aggregator restart with queued update', () => {
  let workspace: Workspace;
  let vehicle: TestVehicle;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
    vehicle = await TestVehicle.connect(broker, 'queued-veh');
  });

  after(async () => {
    await vehicle.close();
    await broker.close();
    workspace.remove();
  });

  test('queued update acked after restart', async () => {
    const first = new Aggregator(
      testOptions(broker, workspace, images, { roundTimeoutMs: 60_000 }),
    );
    await first.start();
    const task = await vehicle.nextTask();
    await first.stop();

    // The aggregator's session is persistent (clean: false), so the broker
    // queues this QoS 1 update and delivers it while the restarted
    // aggregator is still connecting.
    await vehicle.publish(encodeModelUpdate(buildUpdate(vehicle.id, task)));
    const { log, lines } = captureLog();
    const second = new Aggregator(
      testOptions(broker, workspace, images, { log }),
    );
    const ack = vehicle.nextAck();
    await second.start();
    const received = await ack;
    await second.stop();

    assert.equal(received.status, AckStatus.Rejected);
    assert.equal(received.reasonCode, ErrorCode.RoundClosed);
    assert.equal(received.round, 1);
    assert.equal(received.currentModelVersion, 0);
    const failures = lines.filter((l) => l.msg === 'message handler failed');
    assert.deepEqual(failures, []);
  });
});

describe('aggregator connection logs', () => {
  test('errors while stopping logged at debug', async () => {
    const ownBroker = await startTestBroker();
    const controller = new AbortController();
    const { log, lines } = captureLog();
    const client = await connectToBroker({
      brokerUrl: `mqtt://127.0.0.1:${ownBroker.port}`,
      clientId: 'connection-log-test',
      subscriptions: ['connection-log-test/#'],
      onMessage: () => undefined,
      signal: controller.signal,
      log,
    });
    const errorLevels = (): number[] =>
      lines.filter((l) => l.msg === 'mqtt client error').map((l) => l.level);

    client.emit('error', new Error('write EPIPE'));
    assert.deepEqual(errorLevels(), [40]);

    controller.abort();
    const afterAbort = lines.length;
    client.emit('error', new Error('write after end'));
    const offline = new Promise<void>((resolve) =>
      client.once('offline', () => resolve()),
    );
    await ownBroker.close();
    await offline;
    await client.endAsync(true);

    assert.deepEqual(errorLevels(), [40, 20]);
    const loud = lines.slice(afterAbort).filter((l) => l.level >= 40);
    assert.deepEqual(loud, []);
    assert.ok(lines.some((l) => l.msg === 'mqtt client offline'));
  });
});
