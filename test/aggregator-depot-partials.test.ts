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
  readPartialHeader,
  type PartialContext,
} from '../aggregator/validate-partial.ts';
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

/** A broker and a workspace, with the vehicles, depots and aggregator on them. */
interface PartialsBed {
  broker: RunningBroker;
  workspace: Workspace;
  images: RealImages;
  vehicles: TestVehicle[];
  depots: TestDepot[];
  aggregator: Aggregator | undefined;
}

/**
 * Registers hooks in the enclosing describe that start a broker and a
 * workspace before its tests and close all the bed contains after them.
 */
function usePartialsBed(): PartialsBed {
  const bed = { vehicles: [], depots: [] } as unknown as PartialsBed;
  before(async () => {
    bed.images = await loadRealImages();
    bed.broker = await startTestBroker();
    bed.workspace = createWorkspace();
  });
  after(async () => {
    await bed.aggregator?.stop();
    await Promise.all(bed.vehicles.map((vehicle) => vehicle.close()));
    await Promise.all(bed.depots.map((depot) => depot.close()));
    await bed.broker.close();
    bed.workspace.remove();
  });
  return bed;
}

/**
 * Connects `vehicleIds` and `depotIds`, then creates (but does not start) an
 * aggregator of two rounds that accepts partials from `acceptedDepots` only.
 */
async function openParticipants(
  bed: PartialsBed,
  vehicleIds: string[],
  depotIds: string[],
  acceptedDepots: string[],
): Promise<Aggregator> {
  const { broker } = bed;
  bed.vehicles = await Promise.all(
    vehicleIds.map((id) => TestVehicle.connect(broker, id)),
  );
  bed.depots = await Promise.all(
    depotIds.map((id) => TestDepot.connect(broker.port, id)),
  );
  bed.aggregator = new Aggregator(
    testOptions(broker, bed.workspace, bed.images, {
      depots: acceptedDepots,
      minVehiclesOnline: vehicleIds.length,
      minUpdates: 1,
      maxRounds: 2,
      roundTimeoutMs: 60_000,
      maxExamplesPerUpdate: 1000,
    }),
  );
  return bed.aggregator;
}

describe('aggregator with depot partials', () => {
  const bed = usePartialsBed();

  test('partials merge, resend, duplicates, bad input', async () => {
    const aggregator = await openParticipants(
      bed,
      ['veh-1', 'veh-2', 'veh-3', 'veh-4'],
      ['depot-a', 'depot-b', 'depot-x'],
      ['depot-a', 'depot-b'],
    );
    const { broker, vehicles, workspace } = bed;
    const [depotA, depotB, unknownDepot] = bed.depots;
    const vehicle = (id: string): TestVehicle =>
      vehicles.find((candidate) => candidate.id === id)!;
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

    // Two depots merge and forward: depot-a with 30 examples, depot-b with 20.
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

    // A copy of round 1's partial, counted in round 1, is acked again.
    const lateCopy = await depotA.send(bytesA);
    assertAccepted(lateCopy, 'depot-a-r1');
    assert.equal(lateCopy.round, 1);
    assert.equal(lateCopy.currentRound, 2);

    // A direct update, then a partial covering the same vehicle.
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
    assert.deepEqual(mixed.duplicateUpdateIds, ['veh-1-via-depot-a-r2']);

    // Each bad input is rejected with the current round and version.
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

    // The other order: a partial first, then a reused id and a direct update.
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
    // 7 (veh-1) + 20 (depot-b) + 9 (veh-2), so no rejected partial counted.
    assert.equal(second.numExamples, 36);
    assert.equal(second.partials, 1);
    assert.deepEqual(second.rejectedByReason, {
      [ErrorCode.DuplicateUpdate]: 3,
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
    assert.equal(second.rejected, 17);
    assert.equal(closedEvents.length, 2);
    const release2 = await fetchRetainedRelease(broker);
    assert.equal(release2.version, 2);
    assert.equal(release2.numVehicles, 4);
    assert.equal(release2.numExamples, 36);
  });
});

describe('depot partial acks and resends', () => {
  const bed = usePartialsBed();

  test('duplicates listed, resends counted once', async () => {
    const aggregator = await openParticipants(
      bed,
      ['veh-1', 'veh-2', 'veh-3'],
      ['depot-a', 'depot-x'],
      ['depot-a'],
    );
    const { broker, vehicles } = bed;
    const [depotA, unknownDepot] = bed.depots;
    const [veh1] = vehicles;
    const firstClosed = once(aggregator, 'round-closed');
    await aggregator.start();
    const task = await veh1.nextTask();
    const mean = (_name: string, i: number): number => ((i % 3) - 1) / 400;

    // veh-1's update reaches the fleet directly and through depot-a.
    const direct = buildUpdate('veh-1', task, { numExamples: 7 });
    const directAck = await veh1.send(encodeModelUpdate(direct));
    assert.equal(directAck.status, AckStatus.Accepted, directAck.reason);
    const all = buildPartial(
      'depot-a',
      task,
      [
        ['veh-1', 7],
        ['veh-2', 20],
        ['veh-3', 5],
      ],
      mean,
      { partialId: 'depot-a-r1-all' },
    );
    all.updates[0].updateId = direct.updateId;
    const current1 = { round: 1, modelVersion: 0 };
    for (let attempt = 0; attempt < 2; attempt++) {
      const ack = await depotA.send(all);

      assertRejected(ack, ErrorCode.DuplicateUpdate, current1);
      assert.equal(ack.updateId, 'depot-a-r1-all');
      assert.deepEqual(ack.duplicateUpdateIds, [direct.updateId]);
      assert.match(ack.reason, /update veh-1-r1 was already received/);
    }
    const rest = encodePartialAggregate(
      buildPartial(
        'depot-a',
        task,
        [
          ['veh-2', 20],
          ['veh-3', 5],
        ],
        mean,
        { partialId: 'depot-a-r1-rest' },
      ),
    );
    const restAck = await depotA.send(rest);
    assertAccepted(restAck, 'depot-a-r1-rest');
    assert.deepEqual(restAck.duplicateUpdateIds, []);

    const [first] = (await firstClosed) as [RoundClosedEvent];
    assert.equal(first.round, 1);
    assert.equal(first.accepted, 3);
    assert.equal(first.numVehicles, 3);
    assert.equal(first.numExamples, 7 + 20 + 5);
    assert.equal(first.partials, 1);
    assert.deepEqual(first.rejectedByReason, {
      [ErrorCode.DuplicateUpdate]: 1,
    });
    assert.equal(first.rejected, 1);
    const release = await fetchRetainedRelease(broker);
    assert.equal(release.version, 1);
    assert.equal(release.numVehicles, 3);
    assert.equal(release.numExamples, 32);

    // The resend of round 1's counted partial is acked again.
    const secondClosed = once(aggregator, 'round-closed');
    const task2 = await veh1.nextTask();
    assert.equal(task2.round, 2);
    const current2 = { round: 2, modelVersion: 1 };
    const lateRest = await depotA.send(rest);
    assertAccepted(lateRest, 'depot-a-r1-rest');
    assert.equal(lateRest.round, 1);
    assert.equal(lateRest.currentRound, 2);

    // Each rejection is acked under the partial's id.
    const bad = (
      partialId: string,
      overrides: Partial<PartialAggregate> = {},
    ): PartialAggregate =>
      buildPartial('depot-a', task2, [['veh-2', 20]], mean, {
        partialId,
        ...overrides,
      });
    const wrongShape = bad('bad-shape');
    wrongShape.meanDeltas[3] = encodeFloat32Tensor(
      'dense2/bias',
      [42],
      new Float32Array(42),
    );
    const cases: Array<[TestDepot, PartialAggregate, string]> = [
      [
        depotA,
        bad('bad-nan', {
          meanDeltas: buildDeltas(task2.training.trainableTensors, (_n, i) =>
            i === 3 ? Number.NaN : 0,
          ),
        }),
        ErrorCode.NonFiniteValue,
      ],
      [depotA, wrongShape, ErrorCode.WrongShape],
      [
        depotA,
        bad('bad-range', {
          meanDeltas: buildDeltas(task2.training.trainableTensors, () => 2000),
        }),
        ErrorCode.ValueOutOfRange,
      ],
      [
        depotA,
        bad('bad-repeat', {
          updates: [
            { vehicleId: 'veh-2', updateId: 'veh-2-a', numExamples: 10 },
            { vehicleId: 'veh-2', updateId: 'veh-2-b', numExamples: 10 },
          ],
        }),
        ErrorCode.MalformedPayload,
      ],
      [
        unknownDepot,
        buildPartial('depot-x', task2, [['veh-2', 20]], mean, {
          partialId: 'bad-depot',
        }),
        ErrorCode.InvalidConfig,
      ],
      [depotA, bad('bad-round', { round: 9 }), ErrorCode.WrongRound],
    ];
    for (const [depot, partial, code] of cases) {
      const ack = await depot.send(partial);

      assertRejected(ack, code, current2);
      assert.equal(ack.updateId, partial.partialId);
      assert.equal(ack.round, partial.round);
      assert.deepEqual(ack.duplicateUpdateIds, []);
    }

    // Two more copies of the NaN partial get the same ack.
    const nanBytes = encodePartialAggregate(cases[0][1]);
    for (let attempt = 0; attempt < 2; attempt++) {
      const ack = await depotA.send(nanBytes);

      assertRejected(ack, ErrorCode.NonFiniteValue, current2);
      assert.equal(ack.updateId, 'bad-nan');
    }

    for (const vehicle of vehicles) {
      const ack = await vehicle.send(
        encodeModelUpdate(buildUpdate(vehicle.id, task2)),
      );
      assert.equal(ack.status, AckStatus.Accepted, ack.reason);
    }
    const [second] = (await secondClosed) as [RoundClosedEvent];
    assert.equal(second.round, 2);
    assert.equal(second.accepted, 3);
    assert.equal(second.numExamples, 30);
    assert.equal(second.partials, 0);
    assert.deepEqual(second.rejectedByReason, {
      [ErrorCode.NonFiniteValue]: 1,
      [ErrorCode.WrongShape]: 1,
      [ErrorCode.ValueOutOfRange]: 1,
      [ErrorCode.MalformedPayload]: 1,
      [ErrorCode.InvalidConfig]: 1,
      [ErrorCode.WrongRound]: 1,
    });
    assert.equal(second.rejected, 6);

    // The resend is acked again once the last round has closed.
    const afterLast = await depotA.send(rest);
    assertAccepted(afterLast, 'depot-a-r1-rest');
    assert.equal(afterLast.currentRound, 2);
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
    const counted = context({
      countedPartial: () => ({ round: 3, updateIds: ['u-1', 'u-2'] }),
    });

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

  test('copy from earlier round accepted', () => {
    const earlier = context({
      openRound: 4,
      lastRound: 4,
      countedPartial: () => ({ round: 3, updateIds: ['u-1', 'u-2'] }),
    });
    const otherRound = context({
      countedPartial: () => ({ round: 2, updateIds: ['u-1', 'u-2'] }),
    });

    const copy = decide(partial(0), earlier);
    const reused = decide(partial(0), otherRound);

    assert.equal(copy.accepted, true);
    assert.equal(copy.accepted ? copy.meanDeltas : 'rejected', undefined);
    assert.equal(
      reused.accepted ? undefined : reused.code,
      ErrorCode.DuplicateUpdate,
    );
  });

  test('counted entries listed as duplicates', () => {
    const cases: Array<[Partial<PartialContext>, string[]]> = [
      [{ seenUpdateIds: new Set(['u-1']) }, ['u-1']],
      [{ acceptedVehicles: new Set(['veh-2']) }, ['u-2']],
      [
        {
          seenUpdateIds: new Set(['u-2']),
          acceptedVehicles: new Set(['veh-1', 'veh-2']),
        },
        ['u-1', 'u-2'],
      ],
    ];

    for (const [overrides, expected] of cases) {
      const decision = decide(partial(0), context(overrides));

      assert.equal(decision.accepted, false);
      assert.equal(
        decision.accepted ? undefined : decision.code,
        ErrorCode.DuplicateUpdate,
      );
      assert.deepEqual(
        decision.accepted ? undefined : decision.duplicateUpdateIds,
        expected,
      );
      assert.match(
        decision.accepted ? '' : decision.reason,
        /already (received|has an accepted update) in round 3/,
      );
    }
  });

  test('counted entry with other problem', () => {
    const counted = { seenUpdateIds: new Set(['u-1']) };
    const cases: Array<[PartialAggregate, Partial<PartialContext>, string]> = [
      [partial(Number.NaN), counted, ErrorCode.NonFiniteValue],
      [
        partial(0, {
          updates: [
            { vehicleId: 'veh-1', updateId: 'u-1', numExamples: 2 },
            { vehicleId: 'veh-2', updateId: 'u-2', numExamples: 1 },
          ],
          numExamples: 3,
        }),
        counted,
        ErrorCode.InvalidExampleCount,
      ],
      [
        partial(0),
        { ...counted, selectedVehicles: new Set(['veh-1']) },
        ErrorCode.VehicleNotSelected,
      ],
      [
        partial(0, {
          updates: [
            { vehicleId: 'veh-1', updateId: 'u-1', numExamples: 1 },
            { vehicleId: 'veh-2', updateId: 'u-1', numExamples: 1 },
          ],
        }),
        counted,
        ErrorCode.DuplicateUpdate,
      ],
    ];

    for (const [bad, overrides, code] of cases) {
      const decision = decide(bad, context(overrides));

      assert.equal(decision.accepted ? undefined : decision.code, code);
      assert.equal(
        decision.accepted ? 'accepted' : decision.duplicateUpdateIds,
        undefined,
      );
    }
  });

  test('rejections carry partial id', () => {
    const repeated = encodePartialAggregate(
      partial(0, {
        updates: [
          { vehicleId: 'veh-1', updateId: 'u-1', numExamples: 1 },
          { vehicleId: 'veh-1', updateId: 'u-2', numExamples: 1 },
        ],
      }),
    );
    const cases: Array<[string, Uint8Array, PartialContext, string]> = [
      [
        'NaN',
        encodePartialAggregate(partial(Number.NaN)),
        context(),
        ErrorCode.NonFiniteValue,
      ],
      [
        'out of range',
        encodePartialAggregate(partial(2 ** 36)),
        context(),
        ErrorCode.ValueOutOfRange,
      ],
      [
        'wrong shape',
        encodePartialAggregate(
          partial(0, {
            meanDeltas: [
              encodeFloat32Tensor('dense2/bias', [2], new Float32Array(2)),
            ],
          }),
        ),
        context(),
        ErrorCode.WrongShape,
      ],
      ['repeated vehicle', repeated, context(), ErrorCode.MalformedPayload],
      [
        'unknown depot',
        encodePartialAggregate(partial(0)),
        context({ depots: new Set(['depot-b']) }),
        ErrorCode.InvalidConfig,
      ],
      [
        'too large',
        encodePartialAggregate(partial(0)),
        context({ maxMessageBytes: 16 }),
        ErrorCode.PayloadTooLarge,
      ],
      [
        'wrong round',
        encodePartialAggregate(partial(0, { round: 9 })),
        context(),
        ErrorCode.WrongRound,
      ],
    ];

    for (const [name, payload, partialContext, code] of cases) {
      const decision = decidePartial('depot-a', payload, partialContext);

      assert.equal(decision.accepted ? undefined : decision.code, code, name);
      assert.equal(
        decision.accepted ? undefined : decision.header?.partialId,
        'p-1',
        name,
      );
    }
  });

  test('header of unreadable payloads', () => {
    const bytes = encodePartialAggregate(partial(0, { round: 7 }));

    assert.deepEqual(readPartialHeader(bytes), {
      partialId: 'p-1',
      round: 7,
    });
    assert.equal(
      readPartialHeader(new Uint8Array([0xff, 0x01, 0x02])),
      undefined,
    );
    assert.equal(
      readPartialHeader(bytes.subarray(0, bytes.length - 3)),
      undefined,
    );
    assert.equal(readPartialHeader(new Uint8Array(0)), undefined);
    assert.equal(
      readPartialHeader(encodePartialAggregate(partial(0, { partialId: '' }))),
      undefined,
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
