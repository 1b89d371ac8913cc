import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { connect, type MqttClient } from 'mqtt';
import {
  Aggregator,
  type AggregatorOptions,
  type RoundClosedEvent,
  type RoundOpenedEvent,
} from '../aggregator/index.ts';
import {
  decidePartial,
  type PartialContext,
} from '../aggregator/depot-partials.ts';
import { MAX_EXAMPLES_PER_ADD } from '../aggregator/fedavg.ts';
import {
  AckStatus,
  ErrorCode,
  TensorEncoding,
  decodeTensorValues,
  decodeUpdateAck,
  encodeFloat32Tensor,
  encodeModelUpdate,
  encodePartialAggregate,
  isFleetError,
  type PartialAggregate,
  type RoundTask,
  type UpdateAck,
  type WireTensor,
} from '../protocol/index.ts';
import { parseUpdateCompression } from '../protocol/compression/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { importOnnxWeights } from '../models/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  FLEET_ID,
  TestVehicle,
  buildDeltas,
  buildUpdate,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  quietLog,
  startTestBroker,
  testOptions,
  topics,
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';
import { createKeyFolder } from './signing-fixtures.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const ACK_TIMEOUT_MS = 20_000;

/**
 * Stand-in for a depot aggregator: an MQTT client that publishes encoded
 * partials on its depot's partial topic and receives its acks.
 */
class TestDepot {
  readonly id: string;
  readonly client: MqttClient;
  readonly #acks: UpdateAck[] = [];
  readonly #waiters: Array<(ack: UpdateAck) => void> = [];

  private constructor(id: string, client: MqttClient) {
    this.id = id;
    this.client = client;
    client.on('message', (topic, payload) => {
      if (topic !== topics.depotAck(id)) return;
      const ack = decodeUpdateAck(payload);
      const waiter = this.#waiters.shift();
      if (waiter === undefined) this.#acks.push(ack);
      else waiter(ack);
    });
  }

  static async connect(port: number, id: string): Promise<TestDepot> {
    const client = connect(`mqtt://127.0.0.1:${port}`, {
      protocolVersion: 4,
      clientId: `depot-${id}`,
      reconnectPeriod: 0,
    });
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => resolve());
      client.once('error', reject);
    });
    await client.subscribeAsync(topics.depotAck(id), { qos: 1 });
    return new TestDepot(id, client);
  }

  nextAck(): Promise<UpdateAck> {
    const ack = this.#acks.shift();
    if (ack !== undefined) return Promise.resolve(ack);
    return new Promise((resolve, reject) => {
      const onAck = (value: UpdateAck): void => {
        clearTimeout(timer);
        resolve(value);
      };
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(onAck), 1);
        reject(new Error(`timed out waiting for an ack of depot ${this.id}`));
      }, ACK_TIMEOUT_MS);
      this.#waiters.push(onAck);
    });
  }

  /** Publishes `payload` on this depot's partial topic and returns the ack. */
  async send(payload: PartialAggregate | Uint8Array): Promise<UpdateAck> {
    const bytes =
      payload instanceof Uint8Array ? payload : encodePartialAggregate(payload);
    const ack = this.nextAck();
    await this.client.publishAsync(
      topics.depotPartial(this.id),
      Buffer.from(bytes),
      { qos: 1 },
    );
    return ack;
  }

  async close(): Promise<void> {
    await endClient(this.client, 2000);
  }
}

/** Builds a partial of `depotId` for `task` over `entries`. */
function buildPartial(
  depotId: string,
  task: RoundTask,
  entries: Array<[vehicleId: string, numExamples: number]>,
  value: (name: string, index: number) => number,
  overrides: Partial<PartialAggregate> = {},
): PartialAggregate {
  const updates = entries.map(([vehicleId, numExamples]) => ({
    vehicleId,
    updateId: `${vehicleId}-via-${depotId}-r${task.round}`,
    numExamples,
  }));
  return {
    partialId: `${depotId}-r${task.round}`,
    depotId,
    modelName: task.modelName,
    baseModelVersion: task.modelVersion,
    round: task.round,
    updates,
    numExamples: updates.reduce((sum, entry) => sum + entry.numExamples, 0),
    meanDeltas: buildDeltas(task.training.trainableTensors, value),
    createdAtMs: Date.now(),
    ...overrides,
  };
}

function assertAccepted(ack: UpdateAck, updateId: string): void {
  assert.equal(
    ack.status,
    AckStatus.Accepted,
    `rejected: ${ack.reasonCode} ${ack.reason}`,
  );
  assert.equal(ack.reasonCode, '');
  assert.equal(ack.updateId, updateId);
}

/** Asserts a rejection with `code` that names the current round. */
function assertRejected(
  ack: UpdateAck,
  code: string,
  current: { round: number; modelVersion: number },
): void {
  assert.equal(
    ack.status,
    AckStatus.Rejected,
    `expected ${code}, got ${ack.reasonCode}`,
  );
  assert.equal(ack.reasonCode, code, ack.reason);
  assert.ok(ack.reason.length > 0);
  assert.equal(ack.currentRound, current.round);
  assert.equal(ack.currentModelVersion, current.modelVersion);
}

/** Unit in the last place of the float32 nearest to `value`. */
function float32Ulp(value: number): number {
  const magnitude = Math.abs(value);
  if (magnitude < 2 ** -126) return 2 ** -149;
  return 2 ** (Math.floor(Math.log2(magnitude)) - 23);
}

/** Float32 values of each tensor in `tensors`, by name. */
function valuesOf(tensors: WireTensor[]): Map<string, Float32Array> {
  return new Map(tensors.map((t) => [t.name, decodeTensorValues(t)]));
}

describe('aggregator with depot partials', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let images: RealImages;
  let vehicles: TestVehicle[] = [];
  let depots: TestDepot[] = [];
  let aggregator: Aggregator | undefined;

  before(async () => {
    images = await loadRealImages();
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await aggregator?.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await Promise.all(depots.map((depot) => depot.close()));
    await broker.close();
    workspace.remove();
  });

  test('partials merge, resend, duplicates, bad input', async () => {
    vehicles = await Promise.all(
      ['veh-1', 'veh-2', 'veh-3', 'veh-4'].map((id) =>
        TestVehicle.connect(broker, id),
      ),
    );
    depots = await Promise.all(
      ['depot-a', 'depot-b', 'depot-x'].map((id) =>
        TestDepot.connect(broker.port, id),
      ),
    );
    const [depotA, depotB, unknownDepot] = depots;
    const vehicle = (id: string): TestVehicle =>
      vehicles.find((candidate) => candidate.id === id)!;
    aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        depots: ['depot-a', 'depot-b'],
        minVehiclesOnline: 4,
        minUpdates: 1,
        maxRounds: 2,
        roundTimeoutMs: 60_000,
        maxExamplesPerUpdate: 1000,
      }),
    );
    const closedEvents: RoundClosedEvent[] = [];
    aggregator.on('round-closed', (event) => closedEvents.push(event));
    const opened = once(aggregator, 'round-opened');
    const firstClosed = once(aggregator, 'round-closed');
    await aggregator.start();
    const [openedEvent] = (await opened) as [RoundOpenedEvent];
    const task = await vehicle('veh-1').nextTask();

    assert.deepEqual(openedEvent.selected, [
      'veh-1',
      'veh-2',
      'veh-3',
      'veh-4',
    ]);

    // (a) and (b): depot-a merged 30 examples, depot-b 20.
    const meanA = (_name: string, i: number): number => ((i % 7) - 3) / 500;
    const meanB = (name: string, i: number): number =>
      (name === 'dense2/bias' ? -1 : 1) * (((i % 5) + 1) / 300);
    const partialA = buildPartial(
      'depot-a',
      task,
      [
        ['veh-1', 10],
        ['veh-2', 20],
      ],
      meanA,
    );
    const partialB = buildPartial(
      'depot-b',
      task,
      [
        ['veh-3', 5],
        ['veh-4', 15],
      ],
      meanB,
    );
    const bytesA = encodePartialAggregate(partialA);
    assertAccepted(await depotA.send(bytesA), 'depot-a-r1');
    const resent = await depotA.send(bytesA);
    assertAccepted(resent, 'depot-a-r1');
    assert.equal(resent.currentRound, 1);
    assert.equal(aggregator.roundsCompleted, 0);
    assertAccepted(await depotB.send(partialB), 'depot-b-r1');

    const [first] = (await firstClosed) as [RoundClosedEvent];
    assert.equal(first.round, 1);
    assert.equal(first.modelVersion, 1);
    assert.equal(first.accepted, 4);
    assert.equal(first.numVehicles, 4);
    assert.equal(first.numExamples, 50);
    assert.equal(first.partials, 2);
    assert.equal(first.rejected, 0);
    assert.ok(first.durationMs < 60_000, 'round waited for its deadline');

    const release = await fetchRetainedRelease(broker);
    assert.equal(release.version, 1);
    assert.equal(release.numVehicles, 4);
    assert.equal(release.numExamples, 50);
    const released = importOnnxWeights(release.onnx);
    const base = workspace.baseWeights;
    const sentA = valuesOf(partialA.meanDeltas);
    const sentB = valuesOf(partialB.meanDeltas);
    for (const name of task.training.trainableTensors) {
      const got = released.get(name)!;
      const baseValues = base.get(name)!;
      for (let i = 0; i < got.length; i++) {
        const mean = (30 * sentA.get(name)![i] + 20 * sentB.get(name)![i]) / 50;
        const expected = baseValues[i] + mean;
        const scale = Math.max(
          Math.abs(baseValues[i]),
          Math.abs(mean),
          Math.abs(expected),
        );
        const tolerance = 4 * float32Ulp(scale);
        assert.ok(
          Math.abs(got[i] - expected) <= tolerance,
          `${name}[${i}] = ${got[i]}, expected ${expected} +- ${tolerance}`,
        );
      }
    }
    assert.deepEqual(released.get('conv1/kernel'), base.get('conv1/kernel'));

    // Round 2 trains version 1.
    const secondClosed = once(aggregator, 'round-closed');
    const task2 = await vehicle('veh-1').nextTask();
    assert.equal(task2.round, 2);
    assert.equal(task2.modelVersion, 1);
    const current = { round: 2, modelVersion: 1 };

    // A copy of round 1's partial: its updates were counted in round 1.
    assertRejected(
      await depotA.send(bytesA),
      ErrorCode.DuplicateUpdate,
      current,
    );

    // (c) A direct update, then a partial covering the same vehicle.
    const direct1 = buildUpdate('veh-1', task2, { numExamples: 7 });
    const directAck = await vehicle('veh-1').send(encodeModelUpdate(direct1));
    assert.equal(directAck.status, AckStatus.Accepted, directAck.reason);
    const mixed = await depotA.send(
      buildPartial(
        'depot-a',
        task2,
        [
          ['veh-1', 10],
          ['veh-2', 20],
        ],
        meanA,
      ),
    );
    assertRejected(mixed, ErrorCode.DuplicateUpdate, current);
    assert.equal(mixed.updateId, 'depot-a-r2');
    assert.match(mixed.reason, /vehicle veh-1 already has an accepted update/);

    // (d) Each bad input is rejected with the current round and version.
    const valid = (overrides: Partial<PartialAggregate> = {}) =>
      buildPartial('depot-a', task2, [['veh-2', 20]], meanA, {
        partialId: `bad-${Math.random()}`,
        ...overrides,
      });
    const unknown = await unknownDepot.send(
      buildPartial('depot-x', task2, [['veh-2', 20]], meanA),
    );
    assertRejected(unknown, ErrorCode.InvalidConfig, current);
    assert.match(unknown.reason, /depot depot-x is not one of/);

    const wrongRound = await depotA.send(
      buildPartial('depot-a', { ...task2, round: 9 }, [['veh-2', 20]], meanA),
    );
    assertRejected(wrongRound, ErrorCode.WrongRound, current);
    assert.match(wrongRound.reason, /current round is 2, model version 1/);
    assert.equal(wrongRound.round, 9);
    // Ids never accepted, so the closed round decides the code.
    assertRejected(
      await depotA.send(
        buildPartial('depot-a', { ...task2, round: 1 }, [['veh-2', 5]], meanA, {
          partialId: 'late-r1',
          updates: [{ vehicleId: 'veh-2', updateId: 'late', numExamples: 5 }],
        }),
      ),
      ErrorCode.RoundClosed,
      current,
    );
    assertRejected(
      await depotA.send(valid({ baseModelVersion: 0 })),
      ErrorCode.WrongModelVersion,
      current,
    );
    assertRejected(
      await depotA.send(valid({ modelName: 'other-model' })),
      ErrorCode.WrongModelVersion,
      current,
    );
    assertRejected(
      await depotA.send(
        buildPartial(
          'depot-a',
          task2,
          [
            ['veh-2', 20],
            ['veh-9', 5],
          ],
          meanA,
        ),
      ),
      ErrorCode.VehicleNotSelected,
      current,
    );
    assertRejected(
      await depotA.send(
        buildPartial('depot-a', task2, [['veh-2', 1001]], meanA, {
          partialId: 'too-many-examples',
        }),
      ),
      ErrorCode.InvalidExampleCount,
      current,
    );

    const wrongShape = valid();
    wrongShape.meanDeltas[3] = encodeFloat32Tensor(
      'dense2/bias',
      [42],
      new Float32Array(42),
    );
    assertRejected(
      await depotA.send(wrongShape),
      ErrorCode.WrongShape,
      current,
    );
    assertRejected(
      await depotA.send(
        valid({
          meanDeltas: buildDeltas(task2.training.trainableTensors, (_n, i) =>
            i === 3 ? Number.NaN : 0,
          ),
        }),
      ),
      ErrorCode.NonFiniteValue,
      current,
    );
    const aboveCap = await depotA.send(
      valid({
        meanDeltas: buildDeltas(task2.training.trainableTensors, () => 2000),
      }),
    );
    assertRejected(aboveCap, ErrorCode.ValueOutOfRange, current);
    assert.match(aboveCap.reason, /expected \|value\| <= 1000/);
    const half = valid();
    half.meanDeltas[1] = {
      ...half.meanDeltas[1],
      encoding: TensorEncoding.Float16,
    };
    assertRejected(
      await depotA.send(half),
      ErrorCode.UnsupportedEncoding,
      current,
    );
    assertRejected(
      await depotA.send(
        valid({
          meanDeltas: buildDeltas(
            task2.training.trainableTensors.slice(1),
            () => 0,
          ),
        }),
      ),
      ErrorCode.WrongTensors,
      current,
    );
    const garbage = await depotA.send(new Uint8Array([0xff, 0x01, 0x02]));
    assertRejected(garbage, ErrorCode.MalformedPayload, current);
    assert.equal(garbage.updateId, 'unknown');
    assertRejected(
      await depotA.send(valid({ depotId: 'depot-b' })),
      ErrorCode.MalformedPayload,
      current,
    );

    // (c) again: a partial first, then a direct update and a reused id.
    const partialB2 = buildPartial(
      'depot-b',
      task2,
      [
        ['veh-3', 5],
        ['veh-4', 15],
      ],
      meanB,
    );
    assertAccepted(await depotB.send(partialB2), 'depot-b-r2');
    const reused = await depotB.send({
      ...partialB2,
      updates: [partialB2.updates[0]],
      numExamples: 5,
    });
    assertRejected(reused, ErrorCode.DuplicateUpdate, current);
    assert.match(reused.reason, /expected a new partial id/);
    const direct3 = await vehicle('veh-3').send(
      encodeModelUpdate(buildUpdate('veh-3', task2)),
    );
    assertRejected(direct3, ErrorCode.DuplicateUpdate, current);
    assert.equal(aggregator.roundsCompleted, 1);

    const direct2 = buildUpdate('veh-2', task2, { numExamples: 9 });
    const lastAck = await vehicle('veh-2').send(encodeModelUpdate(direct2));
    assert.equal(lastAck.status, AckStatus.Accepted, lastAck.reason);

    const [second] = (await secondClosed) as [RoundClosedEvent];
    assert.equal(second.round, 2);
    assert.equal(second.accepted, 4);
    assert.equal(second.numVehicles, 4);
    // 7 (veh-1) + 20 (depot-b) + 9 (veh-2): no rejected partial counted.
    assert.equal(second.numExamples, 36);
    assert.equal(second.partials, 1);
    assert.deepEqual(second.rejectedByReason, {
      [ErrorCode.DuplicateUpdate]: 4,
      [ErrorCode.InvalidConfig]: 1,
      [ErrorCode.WrongRound]: 1,
      [ErrorCode.RoundClosed]: 1,
      [ErrorCode.WrongModelVersion]: 2,
      [ErrorCode.VehicleNotSelected]: 1,
      [ErrorCode.InvalidExampleCount]: 1,
      [ErrorCode.WrongShape]: 1,
      [ErrorCode.NonFiniteValue]: 1,
      [ErrorCode.ValueOutOfRange]: 1,
      [ErrorCode.UnsupportedEncoding]: 1,
      [ErrorCode.WrongTensors]: 1,
      [ErrorCode.MalformedPayload]: 2,
    });
    assert.equal(second.rejected, 18);
    assert.equal(closedEvents.length, 2);
    const release2 = await fetchRetainedRelease(broker);
    assert.equal(release2.version, 2);
    assert.equal(release2.numVehicles, 4);
    assert.equal(release2.numExamples, 36);
  });
});

describe('decidePartial', () => {
  const shapes = new Map<string, number[]>([['dense2/bias', [4]]]);
  const context = (
    overrides: Partial<PartialContext> = {},
  ): PartialContext => ({
    openRound: 3,
    lastRound: 3,
    modelName: 'model',
    modelVersion: 2,
    selectedVehicles: new Set(['veh-1', 'veh-2']),
    seenUpdateIds: new Set(),
    earlierAccepted: new Map(),
    acceptedVehicles: new Set(),
    acceptedExamples: 0,
    maxExamplesPerUpdate: 1,
    maxAbsDeltaValue: 2 ** 36,
    trainableShapes: shapes,
    maxMessageBytes: 1024 * 1024,
    depots: new Set(['depot-a']),
    countedPartial: () => undefined,
    ...overrides,
  });
  const partial = (
    value: number,
    overrides: Partial<PartialAggregate> = {},
  ): PartialAggregate => ({
    partialId: 'p-1',
    depotId: 'depot-a',
    modelName: 'model',
    baseModelVersion: 2,
    round: 3,
    updates: [
      { vehicleId: 'veh-1', updateId: 'u-1', numExamples: 1 },
      { vehicleId: 'veh-2', updateId: 'u-2', numExamples: 1 },
    ],
    numExamples: 2,
    meanDeltas: [
      encodeFloat32Tensor('dense2/bias', [4], new Float32Array(4).fill(value)),
    ],
    createdAtMs: 1,
    ...overrides,
  });
  const decide = (p: PartialAggregate, c = context()) =>
    decidePartial('depot-a', encodePartialAggregate(p), c);

  test('accepts valid partial with deltas', () => {
    const decision = decide(partial(0.25));

    assert.equal(decision.accepted, true, JSON.stringify(decision));
    assert.deepEqual(
      decision.accepted ? [...decision.meanDeltas!.get('dense2/bias')!] : [],
      [0.25, 0.25, 0.25, 0.25],
    );
  });

  test('weighted value above kernel bound', () => {
    // 2 examples times 2^36 would exceed the sums' bound of 2^36.
    const decision = decide(partial(2 ** 36));

    assert.equal(decision.accepted, false);
    assert.equal(
      decision.accepted ? undefined : decision.code,
      ErrorCode.ValueOutOfRange,
    );
    assert.equal(decide(partial(2 ** 35)).accepted, true);
  });

  test('total examples above kernel maximum', () => {
    const big = MAX_EXAMPLES_PER_ADD;
    const decision = decide(
      partial(0, {
        updates: [
          { vehicleId: 'veh-1', updateId: 'u-1', numExamples: big },
          { vehicleId: 'veh-2', updateId: 'u-2', numExamples: big },
        ],
        numExamples: 2 * big,
      }),
      context({ maxExamplesPerUpdate: big, maxAbsDeltaValue: 1 }),
    );

    assert.equal(decision.accepted, false);
    assert.equal(
      decision.accepted ? undefined : decision.code,
      ErrorCode.InvalidExampleCount,
    );
  });

  test('payload above maxMessageBytes', () => {
    const decision = decide(partial(0), context({ maxMessageBytes: 16 }));

    assert.equal(
      decision.accepted ? undefined : decision.code,
      ErrorCode.PayloadTooLarge,
    );
  });

  test('same update id in two entries', () => {
    const decision = decide(
      partial(0, {
        updates: [
          { vehicleId: 'veh-1', updateId: 'u-1', numExamples: 1 },
          { vehicleId: 'veh-2', updateId: 'u-1', numExamples: 1 },
        ],
      }),
    );

    assert.equal(
      decision.accepted ? undefined : decision.code,
      ErrorCode.DuplicateUpdate,
    );
  });

  test('copy of counted partial accepted', () => {
    const counted = context({ countedPartial: () => ['u-1', 'u-2'] });

    const copy = decide(partial(0), counted);
    const reused = decide(
      partial(0, {
        updates: [{ vehicleId: 'veh-1', updateId: 'u-9', numExamples: 2 }],
      }),
      counted,
    );

    assert.equal(copy.accepted, true);
    assert.equal(copy.accepted ? copy.meanDeltas : 'rejected', undefined);
    assert.equal(
      reused.accepted ? undefined : reused.code,
      ErrorCode.DuplicateUpdate,
    );
  });

  test('between rounds rejects as closed', () => {
    const decision = decide(partial(0), context({ openRound: undefined }));

    assert.equal(
      decision.accepted ? undefined : decision.code,
      ErrorCode.RoundClosed,
    );
  });
});

describe('depots option', () => {
  let workspace: Workspace;

  before(() => {
    workspace = createWorkspace();
  });

  after(() => {
    workspace.remove();
  });

  const optionsWith = (
    overrides: Partial<AggregatorOptions>,
  ): AggregatorOptions => ({
    fleetId: FLEET_ID,
    // Never connected: the constructor only checks options.
    brokerUrl: 'mqtt://127.0.0.1:1',
    stateDir: join(workspace.dir, 'state'),
    baseWeightsPath: workspace.baseWeightsPath,
    log: quietLog,
    depots: ['depot-a', 'depot-b'],
    ...overrides,
  });

  const assertInvalid = (
    overrides: Partial<AggregatorOptions>,
    pattern: RegExp,
  ): void => {
    assert.throws(
      () => new Aggregator(optionsWith(overrides)),
      (err: unknown) =>
        isFleetError(err, ErrorCode.InvalidConfig) && pattern.test(err.message),
    );
  };

  test('bad depot ids rejected', () => {
    assertInvalid({ depots: ['depot/a'] }, /depot id "depot\/a"/);
    assertInvalid({ depots: [''] }, /depot id ""/);
    assertInvalid({ depots: ['depot+a'] }, /depot id "depot\+a"/);
    assertInvalid({ depots: ['depot-a', 'depot-a'] }, /depot-a twice/);
  });

  test('incompatible options rejected', () => {
    const keys = createKeyFolder();
    try {
      const key = keys.createKey('veh-1');
      const keysPath = keys.writePublicKeys('keys.json', [key], 'veh-1');
      const cases: Array<[Partial<AggregatorOptions>, RegExp]> = [
        [{ aggregation: 'median' }, /combined with aggregation median/],
        [{ aggregation: 'krum' }, /combined with aggregation krum/],
        [
          {
            differentialPrivacy: {
              clipNorm: 1,
              noiseMultiplier: 1,
              targetEpsilon: 10,
              delta: 1e-5,
            },
          },
          /combined with differentialPrivacy/,
        ],
        [
          { secureAggregation: {}, minUpdates: 2 },
          /combined with secureAggregation/,
        ],
        [
          { normBound: { action: 'clip', medianFactor: 2 } },
          /combined with normBound/,
        ],
        [{ asyncBuffer: { bufferSize: 2 } }, /combined with asyncBuffer/],
        [{ vehicleKeysPath: keysPath }, /combined with vehicleKeysPath/],
      ];
      for (const [overrides, pattern] of cases) {
        assertInvalid(overrides, pattern);
      }
    } finally {
      keys.remove();
    }
  });

  test('compression and empty list allowed', () => {
    const int8 = new Aggregator(
      optionsWith({ updateCompression: parseUpdateCompression('int8') }),
    );
    const off = new Aggregator(optionsWith({ depots: [] }));

    assert.deepEqual(int8.options.depots, ['depot-a', 'depot-b']);
    assert.deepEqual(off.options.depots, []);
  });
});

/** Runs aggregator/main.ts with `args`, resolving at `waitFor` or exit. */
function runAggregator(args: string[], waitFor?: string) {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'aggregator/main.ts', ...args],
    { cwd: REPOSITORY_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  const exited = once(child, 'exit') as Promise<[number | null, string | null]>;
  const reached = new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer): void => {
      output += chunk.toString();
      if (waitFor !== undefined && output.includes(waitFor)) resolve();
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', () =>
      waitFor === undefined ? resolve() : reject(new Error(output)),
    );
  });
  return { child, exited, reached, output: () => output };
}

describe('aggregator --depots flag', () => {
  let broker: RunningBroker;
  let workspace: Workspace;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await broker.close();
    workspace.remove();
  });

  const baseArgs = (): string[] => [
    '--fleet-id',
    FLEET_ID,
    '--broker-url',
    `mqtt://127.0.0.1:${broker.port}`,
    '--state-dir',
    join(workspace.dir, 'state'),
    '--base-weights',
    workspace.baseWeightsPath,
  ];

  test('flag subscribes to listed depots', async () => {
    const depot = await TestDepot.connect(broker.port, 'depot-b');
    const run = runAggregator(
      [...baseArgs(), '--depots', ' depot-a, depot-b '],
      'waiting for vehicles',
    );
    try {
      await run.reached;
      const ack = await depot.send(new Uint8Array([0xff, 0x01]));

      assert.equal(ack.status, AckStatus.Rejected);
      assert.equal(ack.reasonCode, ErrorCode.MalformedPayload);
      assert.match(run.output(), /"depots":\["depot-a","depot-b"\]/);
    } finally {
      run.child.kill('SIGTERM');
      const [code] = await run.exited;
      await depot.close();
      assert.equal(code, 0, run.output());
    }
  });

  test('invalid depot id exits with 2', async () => {
    const run = runAggregator([...baseArgs(), '--depots', 'depot-a,bad/id']);

    const [code] = await run.exited;

    assert.equal(code, 2);
    assert.match(run.output(), /INVALID_CONFIG/);
    assert.match(run.output(), /bad\/id/);
  });

  test('depots with median exits with 2', async () => {
    const run = runAggregator([
      ...baseArgs(),
      '--depots',
      'depot-a',
      '--aggregation',
      'median',
    ]);

    const [code] = await run.exited;

    assert.equal(code, 2);
    assert.match(run.output(), /INVALID_CONFIG/);
  });
});
