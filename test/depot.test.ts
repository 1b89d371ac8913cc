import assert from 'node:assert/strict';
import { once } from 'node:events';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect, type MqttClient } from 'mqtt';
import { Aggregator, ModelStore } from '../aggregator/index.ts';
import type { Depot } from '../aggregator/depot/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import { loadLabelledImages, resolveDataDir, subset } from '../models/index.ts';
import {
  AckStatus,
  ErrorCode,
  decodeTensorValues,
  decodeUpdateAck,
  decodeUpdatePayload,
  encodeModelUpdate,
  type ModelUpdate,
  type UpdateAck,
} from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  FLEET_ID,
  TestVehicle,
  buildUpdate,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  quietLog,
  startTestBroker,
  testOptions,
  topics,
  type Workspace,
} from './aggregator-fixtures.ts';
import {
  FakeFleet,
  runFirstRound,
  startDepot,
  waitUntil,
} from './depot-fixtures.ts';

/**
 * Frames of each vehicle, unequal so that the FedAvg weights differ
 * within and across depots.
 */
const FRAME_COUNTS = [50, 100, 150, 100];

/** Largest difference allowed between released and recomputed weights. */
const WEIGHT_TOLERANCE = 1e-7;

/** Subscribes to every vehicle update on `broker` and keeps the last one. */
async function spyOnUpdates(
  broker: RunningBroker,
  updates: Map<string, ModelUpdate>,
): Promise<MqttClient> {
  const spy = connect(`mqtt://127.0.0.1:${broker.port}`, {
    protocolVersion: 4,
    clientId: `update-spy-${broker.port}`,
    reconnectPeriod: 0,
  });
  spy.on('message', (_topic, payload) => {
    const update = decodeUpdatePayload(payload);
    updates.set(update.vehicleId, update);
  });
  await spy.subscribeAsync(topics.allUpdates(), { qos: 1 });
  return spy;
}

describe('hierarchical aggregation through two depots', () => {
  const DEPOTS: Record<string, string[]> = {
    'depot-a': ['veh-a1', 'veh-a2'],
    'depot-b': ['veh-b1', 'veh-b2'],
  };
  let fleetBroker: RunningBroker;
  const depotBrokers = new Map<string, RunningBroker>();
  let workspace: Workspace;
  let aggregator: Aggregator | undefined;
  const depots: Depot[] = [];
  const agents: VehicleAgent[] = [];
  const spies: MqttClient[] = [];

  before(async () => {
    fleetBroker = await startTestBroker();
    for (const depotId of Object.keys(DEPOTS)) {
      depotBrokers.set(depotId, await startTestBroker());
    }
    workspace = createWorkspace(13);
  });

  after(async () => {
    await aggregator?.stop();
    await Promise.all(agents.map((agent) => agent.stop()));
    await Promise.all(depots.map((depot) => depot.stop()));
    await Promise.all(spies.map((spy) => endClient(spy, 2000)));
    await fleetBroker?.close();
    for (const broker of depotBrokers.values()) await broker.close();
    workspace?.remove();
  });

  test(
    'four vehicles train and deploy through depots',
    { timeout: 180_000 },
    async () => {
      const images = await loadRealImages();
      const frames = await loadLabelledImages(resolveDataDir(), {
        limit: 400,
      });
      const updates = new Map<string, ModelUpdate>();
      const vehicleIds = Object.values(DEPOTS).flat();
      for (const [depotId, ids] of Object.entries(DEPOTS)) {
        const broker = depotBrokers.get(depotId)!;
        spies.push(await spyOnUpdates(broker, updates));
        depots.push(
          await startDepot({
            depotId,
            fleetId: FLEET_ID,
            upstreamUrl: `mqtt://127.0.0.1:${fleetBroker.port}`,
            downstreamUrl: `mqtt://127.0.0.1:${broker.port}`,
            stateDir: join(workspace.dir, depotId),
            log: quietLog,
          }),
        );
        for (const vehicleId of ids) {
          const index = vehicleIds.indexOf(vehicleId);
          const start = FRAME_COUNTS.slice(0, index).reduce((a, b) => a + b, 0);
          const own = Array.from(
            { length: FRAME_COUNTS[index] },
            (_, i) => start + i,
          );
          agents.push(
            new VehicleAgent({
              vehicleId,
              fleetId: FLEET_ID,
              brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
              stateDir: join(workspace.dir, vehicleId),
              frames: subset(frames, own),
              seed: index + 1,
              log: quietLog,
            }),
          );
        }
      }
      aggregator = new Aggregator(
        testOptions(fleetBroker, workspace, images, {
          depots: Object.keys(DEPOTS),
          minVehiclesOnline: vehicleIds.length,
          minUpdates: vehicleIds.length,
          roundTimeoutMs: 90_000,
        }),
      );
      const closed = await runFirstRound(agents, aggregator, 120_000);

      assert.equal(closed.modelVersion, 1);
      assert.deepEqual(closed.selected, [...vehicleIds].sort());
      assert.equal(closed.accepted, 4);
      assert.equal(closed.numVehicles, 4);
      for (const depotId of Object.keys(DEPOTS)) {
        const release = await fetchRetainedRelease(depotBrokers.get(depotId)!);
        assert.equal(release.version, 1, `release on ${depotId}'s broker`);
        assert.equal(release.numVehicles, 4);
      }

      // The released weights are base + the example-weighted mean delta.
      assert.deepEqual([...updates.keys()].sort(), [...vehicleIds].sort());
      const totalExamples = [...updates.values()].reduce(
        (sum, update) => sum + update.numExamples,
        0,
      );
      assert.equal(closed.numExamples, totalExamples);
      const store = new ModelStore(join(workspace.dir, 'state'), MODEL_NAME);
      const released = store.load(1).weights;
      let maxDifference = 0;
      for (const [name, base] of workspace.baseWeights) {
        const expected = Float64Array.from(base);
        for (const update of updates.values()) {
          const tensor = update.deltas.find((delta) => delta.name === name);
          if (tensor === undefined) continue;
          const weight = update.numExamples / totalExamples;
          const values = decodeTensorValues(tensor);
          for (let i = 0; i < values.length; i++) {
            expected[i] += weight * values[i];
          }
        }
        const actual = released.get(name)!;
        for (let i = 0; i < actual.length; i++) {
          maxDifference = Math.max(
            maxDifference,
            Math.abs(actual[i] - expected[i]),
          );
        }
      }
      assert.ok(
        maxDifference <= WEIGHT_TOLERANCE,
        `released weights differ from base + FedAvg by ${maxDifference}`,
      );
    },
  );
});

describe('depot partial after direct update', () => {
  let fleetBroker: RunningBroker;
  let depotBroker: RunningBroker;
  let workspace: Workspace;
  let aggregator: Aggregator | undefined;
  let depot: Depot | undefined;
  const vehicles: TestVehicle[] = [];
  let direct: MqttClient | undefined;
  let partialSpy: FakeFleet | undefined;

  before(async () => {
    fleetBroker = await startTestBroker();
    depotBroker = await startTestBroker();
    workspace = createWorkspace(19);
  });

  after(async () => {
    await aggregator?.stop();
    await depot?.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    if (direct !== undefined) await endClient(direct, 2000);
    await partialSpy?.close();
    await fleetBroker?.close();
    await depotBroker?.close();
    workspace?.remove();
  });

  test(
    'fleet counts the other entries once',
    { timeout: 120_000 },
    async () => {
      depot = await startDepot({
        depotId: 'depot-a',
        fleetId: FLEET_ID,
        upstreamUrl: `mqtt://127.0.0.1:${fleetBroker.port}`,
        downstreamUrl: `mqtt://127.0.0.1:${depotBroker.port}`,
        stateDir: join(workspace.dir, 'depot-a'),
        log: quietLog,
      });
      // Records the partials only, because the real aggregator acks them.
      partialSpy = await FakeFleet.connect(fleetBroker);
      const v1 = await TestVehicle.connect(depotBroker, 'veh-1');
      const v2 = await TestVehicle.connect(depotBroker, 'veh-2');
      vehicles.push(v1, v2);
      direct = connect(`mqtt://127.0.0.1:${fleetBroker.port}`, {
        protocolVersion: 4,
        clientId: 'veh-1-direct',
        reconnectPeriod: 0,
      });
      const directAcks: UpdateAck[] = [];
      direct.on('message', (_topic, payload) =>
        directAcks.push(decodeUpdateAck(payload)),
      );
      await direct.subscribeAsync(topics.ack('veh-1'), { qos: 1 });
      aggregator = new Aggregator(
        testOptions(fleetBroker, workspace, await loadRealImages(), {
          depots: ['depot-a'],
          minVehiclesOnline: 2,
          minUpdates: 2,
          roundTimeoutMs: 60_000,
        }),
      );
      const roundClosed = once(aggregator, 'round-closed', {
        signal: AbortSignal.timeout(90_000),
      });
      roundClosed.catch(() => {}); // awaited below
      await aggregator.start();
      const [task1, task2] = await Promise.all([
        v1.nextTask(30_000),
        v2.nextTask(30_000),
      ]);
      const update1 = encodeModelUpdate(
        buildUpdate('veh-1', task1, { numExamples: 10 }),
      );
      const update2 = encodeModelUpdate(
        buildUpdate('veh-2', task2, { numExamples: 30 }),
      );

      // veh-1's update reaches the fleet directly first, then the depot.
      await direct.publishAsync(topics.update('veh-1'), Buffer.from(update1), {
        qos: 1,
      });
      const directAck = await waitUntil(
        'direct ack of veh-1',
        () => directAcks[0],
      );
      const ack1 = v1.nextAck(30_000);
      const ack2 = v2.nextAck(30_000);
      await v1.publish(update1);
      await v2.publish(update2);
      const [closed] = await roundClosed;
      const [depotAck1, depotAck2] = await Promise.all([ack1, ack2]);

      assert.equal(directAck.status, AckStatus.Accepted);
      assert.equal(depotAck1.status, AckStatus.Rejected);
      assert.equal(depotAck1.reasonCode, ErrorCode.DuplicateUpdate);
      assert.equal(depotAck2.status, AckStatus.Accepted);
      assert.equal(closed.accepted, 2);
      assert.equal(closed.numExamples, 10 + 30, 'each update counted once');
      const partials = partialSpy.partials;
      assert.equal(partials.length, 2, 'the partial and its rebuilt one');
      assert.deepEqual(
        partials[1].updates.map((entry) => entry.vehicleId),
        ['veh-2'],
      );
    },
  );
});
