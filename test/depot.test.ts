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
  decodeTensorValues,
  decodeUpdatePayload,
  type ModelUpdate,
} from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  FLEET_ID,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  quietLog,
  startTestBroker,
  testOptions,
  topics,
  type Workspace,
} from './aggregator-fixtures.ts';
import { startDepot } from './depot-fixtures.ts';

/**
 * Frames of each vehicle, unequal so that the FedAvg weights differ
 * within and across depots.
 */
const FRAME_COUNTS = [50, 100, 150, 100];

/** Largest difference allowed between released and recomputed weights. */
const WEIGHT_TOLERANCE = 1e-7;

/** Resolves when `agent` deploys `version`; rejects after 90 s. */
function deploymentOf(agent: VehicleAgent, version: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`no deployment of v${version} within 90 s`)),
      90_000,
    );
    agent.on('release-deployed', (event) => {
      if (event.version !== version) return;
      clearTimeout(timer);
      resolve();
    });
  });
}

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
      const deployed = Promise.all(
        agents.map((agent) => deploymentOf(agent, 1)),
      );
      deployed.catch(() => {}); // awaited below, after the round closes
      await Promise.all(agents.map((agent) => agent.start()));

      aggregator = new Aggregator(
        testOptions(fleetBroker, workspace, images, {
          depots: Object.keys(DEPOTS),
          minVehiclesOnline: vehicleIds.length,
          minUpdates: vehicleIds.length,
          roundTimeoutMs: 90_000,
        }),
      );
      const roundClosed = once(aggregator, 'round-closed', {
        signal: AbortSignal.timeout(120_000),
      });
      roundClosed.catch(() => {}); // awaited below, after start()
      await aggregator.start();
      const [closed] = await roundClosed;
      await deployed;

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
