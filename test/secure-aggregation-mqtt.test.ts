/**
 * Secure aggregation rounds over a real broker with real vehicle agents:
 * the aggregator receives only masked inputs, a round survives vehicles
 * that drop out after sharing keys, and the unmasked mean is FedAvg's.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import { connect, type MqttClient } from 'mqtt';

import {
  Aggregator,
  type RoundClosedEvent,
  type RoundFailedEvent,
  type SecurePhaseEvent,
} from '../aggregator/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  DEFAULT_TRAINABLE_LAYERS,
  TENSOR_SPECS,
  tensorNamesOfLayers,
} from '../models/architecture.ts';
import { subset } from '../models/data-split.ts';
import {
  importOnnxWeights,
  loadLabelledImages,
  resolveDataDir,
  type LabelledImages,
} from '../models/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { quantize } from '../secure-aggregation/quantize.ts';
import { quantizationOf } from '../secure-aggregation/update-vector.ts';
import {
  decodeFromVehicle,
  encodeFromVehicle,
} from '../secure-aggregation/wire.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  AckStatus,
  ErrorCode,
  countElements,
  decodeRoundTask,
  encodeModelUpdate,
  type RoundTask,
} from '../protocol/index.ts';
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
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';

const VEHICLES = 10;
const IMAGES_PER_VEHICLE = 40;
const DROPPED = ['veh-08', 'veh-09'];
const TRAINABLE = tensorNamesOfLayers([...DEFAULT_TRAINABLE_LAYERS]);

/** Chi-square statistic of the byte values of `bytes` against uniform. */
function byteChiSquare(bytes: Uint8Array): number {
  const counts = new Float64Array(256);
  for (const byte of bytes) counts[byte] += 1;
  const expected = bytes.length / 256;
  let chi = 0;
  for (const count of counts) chi += (count - expected) ** 2 / expected;
  return chi;
}

/** Pearson correlation of two equally long sequences. */
function correlation(a: ArrayLike<number>, b: ArrayLike<number>): number {
  const n = a.length;
  let meanA = 0;
  let meanB = 0;
  for (let i = 0; i < n; i++) {
    meanA += a[i] / n;
    meanB += b[i] / n;
  }
  let cov = 0;
  let varA = 0;
  let varB = 0;
  for (let i = 0; i < n; i++) {
    const da = a[i] - meanA;
    const db = b[i] - meanB;
    cov += da * db;
    varA += da * da;
    varB += db * db;
  }
  return cov / Math.sqrt(varA * varB);
}

function bytesOf(words: Uint32Array): Uint8Array {
  return new Uint8Array(words.buffer, words.byteOffset, words.byteLength);
}

/** Signed value of each quantized word. */
function signed(words: Uint32Array): Int32Array {
  return new Int32Array(words.buffer, words.byteOffset, words.length);
}

/** Creates a quiet agent that trains on `count` frames from `start`. */
function createAgent(
  broker: RunningBroker,
  workspace: Workspace,
  vehicleId: string,
  frames: LabelledImages,
  slice: { start: number; count: number },
): VehicleAgent {
  return new VehicleAgent({
    vehicleId,
    fleetId: FLEET_ID,
    brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
    stateDir: join(workspace.dir, vehicleId),
    frames: subset(
      frames,
      Array.from({ length: slice.count }, (_, k) => slice.start + k),
    ),
    log: quietLog,
  });
}

describe('secure aggregation over MQTT', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let images: RealImages;
  let frames: LabelledImages;
  const agents: VehicleAgent[] = [];
  const clients: MqttClient[] = [];
  let aggregator: Aggregator | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace(11);
    images = await loadRealImages();
    frames = await loadLabelledImages(resolveDataDir(), {
      limit: VEHICLES * IMAGES_PER_VEHICLE,
    });
  });

  after(async () => {
    await aggregator?.stop();
    for (const agent of agents) await agent.stop();
    for (const client of clients) await endClient(client, 2000);
    await broker.close();
    workspace.remove();
  });

  /** Subscribes an observer to `filter` and collects what it receives. */
  async function observe(
    filter: string,
  ): Promise<Array<{ topic: string; payload: Buffer }>> {
    const client = connect(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
      clientId: `observer-${clients.length}`,
    });
    clients.push(client);
    await new Promise<void>((resolve) =>
      client.once('connect', () => resolve()),
    );
    const seen: Array<{ topic: string; payload: Buffer }> = [];
    client.on('message', (topic, payload) => seen.push({ topic, payload }));
    await client.subscribeAsync(filter, { qos: 1 });
    return seen;
  }

  test(
    'two dropouts, FedAvg mean, uniform inputs',
    { timeout: 180_000 },
    async () => {
      const secureInputs = await observe(`${topics.prefix}/vehicles/+/secagg`);
      const plainUpdates = await observe(topics.allUpdates());
      const vectors = new Map<string, Float32Array>();
      const clipped: string[] = [];

      for (let i = 0; i < VEHICLES; i++) {
        const vehicleId = `veh-${String(i).padStart(2, '0')}`;
        // Unequal shares of the images, so that the weights differ.
        const agent = createAgent(broker, workspace, vehicleId, frames, {
          start: i * IMAGES_PER_VEHICLE,
          count: IMAGES_PER_VEHICLE - 2 * i,
        });
        agent.on('secure-input-ready', (event) => {
          vectors.set(vehicleId, event.values);
          if (event.clipped) clipped.push(vehicleId);
        });
        agents.push(agent);
        await agent.start();
      }

      aggregator = new Aggregator(
        testOptions(broker, workspace, images, {
          minVehiclesOnline: VEHICLES,
          minUpdates: 6,
          roundTimeoutMs: 20_000,
          secureAggregation: { clipNorm: 100, phaseTimeoutMs: 10_000 },
        }),
      );
      const phases: SecurePhaseEvent[] = [];
      aggregator.on('secure-phase', (event) => {
        phases.push(event);
        // Masking begins: the two have shared their keys, and stop before
        // their routed shares arrive, so they never send a masked input.
        if (event.phase === 'mask') {
          for (const agent of agents) {
            if (DROPPED.includes(agent.vehicleId)) void agent.stop();
          }
        }
      });
      const closed = new Promise<RoundClosedEvent>((resolve, reject) => {
        aggregator!.once('round-closed', resolve);
        aggregator!.once('round-failed', (event) =>
          reject(
            new Error(`round failed: ${event.reasonCode} ${event.message}`),
          ),
        );
      });
      await aggregator.start();
      const event = await closed;

      const maskPhase = phases.find((p) => p.phase === 'mask');
      assert.equal(maskPhase?.expected.length, VEHICLES);
      const unmaskPhase = phases.find((p) => p.phase === 'unmask');
      const survivors = agents
        .map((agent) => agent.vehicleId)
        .filter((id) => !DROPPED.includes(id));
      assert.deepEqual(unmaskPhase?.expected, survivors);
      assert.equal(event.accepted, survivors.length);
      assert.equal(event.modelVersion, 1);
      assert.equal(plainUpdates.length, 0, 'no plain update on the broker');
      // Nothing clipped, so the mean is plain FedAvg's.
      assert.deepEqual(clipped, []);

      // The new model is base + sum(w * delta) / sum(w) over survivors.
      const release = await fetchRetainedRelease(broker);
      const released = importOnnxWeights(release.onnx);
      const config = {
        threshold: 6,
        clipNorm: 100,
        exampleCap: IMAGES_PER_VEHICLE,
        maxVehicles: VEHICLES,
        tensorNames: TRAINABLE,
      };
      const step = quantizationOf(config).step;
      let weightSum = 0;
      for (const id of survivors) {
        const values = vectors.get(id)!;
        weightSum += values[values.length - 1];
      }
      const tolerance = (survivors.length * step) / weightSum;
      let offset = 0;
      let compared = 0;
      for (const name of TRAINABLE) {
        const base = workspace.baseWeights.get(name)!;
        const next = released.get(name)!;
        for (let i = 0; i < base.length; i++) {
          let sum = 0;
          for (const id of survivors) sum += vectors.get(id)![offset + i];
          const expected = base[i] + sum / weightSum;
          const ulp = Math.abs(expected) * 2 ** -23;
          assert.ok(
            Math.abs(next[i] - expected) <= tolerance + 2 * ulp,
            `${name}[${i}] is ${next[i]}, FedAvg gives ${expected}`,
          );
          compared += 1;
        }
        offset += base.length;
      }
      assert.equal(compared + 1, vectors.get(survivors[0])!.length);

      // What the aggregator received from each survivor looks random and
      // is uncorrelated with that vehicle's quantized update.
      const masked = new Map<string, Uint32Array>();
      for (const { payload } of secureInputs) {
        const message = decodeFromVehicle(payload, FLEET_ID);
        if (message.body.kind === 'masked-input') {
          masked.set(message.vehicleId, message.body.input.maskedWords);
        }
      }
      assert.deepEqual([...masked.keys()].sort(), survivors);
      for (const id of survivors) {
        const plain = quantize(vectors.get(id)!, quantizationOf(config));
        const seen = masked.get(id)!;
        const limit = 6 / Math.sqrt(plain.length);
        assert.ok(byteChiSquare(bytesOf(plain)) > 10_000, 'plain is skewed');
        assert.ok(
          byteChiSquare(bytesOf(seen)) < 400,
          `bytes of ${id} are not uniform`,
        );
        const r = correlation(signed(plain), seen);
        assert.ok(Math.abs(r) < limit, `correlation ${r} for ${id}`);
      }
    },
  );
});

describe('secure aggregation with DP-FedAvg', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  const agents: VehicleAgent[] = [];
  let plainSender: TestVehicle | undefined;
  let aggregator: Aggregator | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace(12);
  });

  after(async () => {
    await aggregator?.stop();
    for (const agent of agents) await agent.stop();
    await plainSender?.close();
    await broker.close();
    workspace.remove();
  });

  test(
    'DP epsilon, noisy mean, plain update',
    { timeout: 120_000 },
    async () => {
      const images = await loadRealImages();
      const frames = await loadLabelledImages(resolveDataDir(), { limit: 120 });
      const vectors = new Map<string, Float32Array>();
      for (let i = 0; i < 4; i++) {
        const vehicleId = `dp-${i}`;
        const agent = createAgent(broker, workspace, vehicleId, frames, {
          start: i * 30,
          count: 30,
        });
        agent.on('secure-input-ready', (event) =>
          vectors.set(vehicleId, event.values),
        );
        agents.push(agent);
        await agent.start();
      }
      const clipNorm = 100;
      const noiseMultiplier = 1e-6;
      aggregator = new Aggregator(
        testOptions(broker, workspace, images, {
          minVehiclesOnline: 4,
          minUpdates: 3,
          roundTimeoutMs: 20_000,
          differentialPrivacy: {
            clipNorm,
            noiseMultiplier,
            targetEpsilon: 1e15,
            delta: 1e-5,
          },
          secureAggregation: { phaseTimeoutMs: 10_000 },
        }),
      );
      const closed = new Promise<RoundClosedEvent>((resolve, reject) => {
        aggregator!.once('round-closed', resolve);
        aggregator!.once('round-failed', (event) =>
          reject(
            new Error(`round failed: ${event.reasonCode} ${event.message}`),
          ),
        );
      });
      const opened = new Promise<void>((resolve) =>
        aggregator!.once('round-opened', () => resolve()),
      );
      await aggregator.start();
      await opened;

      // A vehicle outside the round sends a plain update, which is rejected.
      plainSender = await TestVehicle.connect(broker, 'plain-1', false);
      const task = await plainSender.nextTask();
      assert.equal(task.secureAggregation?.exampleCap, 0);
      const ack = await plainSender.send(
        encodeModelUpdate(buildUpdate('plain-1', task)),
      );
      assert.equal(ack.status, AckStatus.Rejected);
      assert.equal(ack.reasonCode, ErrorCode.SecureAggregationRequired);

      const event = await closed;
      assert.equal(event.accepted, 4);
      assert.ok(event.privacy !== undefined && event.privacy.epsilon > 0);
      assert.equal(event.privacy.clippedUpdates, undefined);
      // Equal weights: every vector ends in 1.
      for (const values of vectors.values()) {
        assert.equal(values[values.length - 1], 1);
      }

      // New weights = base + (sum + noise) / selected.
      const released = importOnnxWeights(
        (await fetchRetainedRelease(broker)).onnx,
      );
      const noiseBound = (6 * noiseMultiplier * clipNorm) / 4;
      let offset = 0;
      for (const name of TRAINABLE) {
        const base = workspace.baseWeights.get(name)!;
        const next = released.get(name)!;
        for (let i = 0; i < base.length; i++) {
          let sum = 0;
          for (const values of vectors.values()) sum += values[offset + i];
          const expected = base[i] + sum / 4;
          assert.ok(
            Math.abs(next[i] - expected) <= noiseBound,
            `${name}[${i}] is ${next[i]}, expected about ${expected}`,
          );
        }
        offset += base.length;
      }
    },
  );
});

describe('forged masked input', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  const agents: VehicleAgent[] = [];
  let forger: MqttClient | undefined;
  let aggregator: Aggregator | undefined;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace(13);
  });

  after(async () => {
    await aggregator?.stop();
    for (const agent of agents) await agent.stop();
    if (forger !== undefined) await endClient(forger, 2000);
    await broker.close();
    workspace.remove();
  });

  test(
    'random words fail the round, model kept',
    { timeout: 120_000 },
    async () => {
      const images = await loadRealImages();
      const frames = await loadLabelledImages(resolveDataDir(), { limit: 90 });
      for (let i = 0; i < 3; i++) {
        const agent = createAgent(broker, workspace, `forged-${i}`, frames, {
          start: i * 30,
          count: 30,
        });
        agents.push(agent);
        await agent.start();
      }
      forger = connect(`mqtt://127.0.0.1:${broker.port}`, {
        protocolVersion: 4,
        clientId: 'forger',
      });
      await new Promise<void>((resolve) =>
        forger!.once('connect', () => resolve()),
      );

      aggregator = new Aggregator(
        testOptions(broker, workspace, images, {
          minVehiclesOnline: 3,
          minUpdates: 2,
          roundTimeoutMs: 20_000,
          secureAggregation: { phaseTimeoutMs: 10_000 },
        }),
      );
      // The forger reads the retained round task, as any client could.
      let task: RoundTask | undefined;
      forger.on('message', (_topic, payload) => {
        task = decodeRoundTask(payload);
      });
      await forger.subscribeAsync(topics.roundTask(), { qos: 1 });
      const vectorLength =
        TRAINABLE.map(
          (name) => TENSOR_SPECS.find((spec) => spec.name === name)!.shape,
        ).reduce((total, shape) => total + countElements(shape), 0) + 1;
      // As masking begins, words of the right length but random content go
      // out in the name of forged-0, ahead of its own masked input.
      aggregator.on('secure-phase', (event) => {
        if (event.phase !== 'mask' || task === undefined) return;
        const words = new Uint32Array(vectorLength);
        for (let i = 0; i < words.length; i++) {
          words[i] = Math.floor(Math.random() * 2 ** 32);
        }
        const bytes = encodeFromVehicle(
          {
            round: event.round,
            roundOpenedAtMs: task.openedAtMs,
            vehicleId: 'forged-0',
            body: {
              kind: 'masked-input',
              input: { roundId: '', vehicleId: 'forged-0', maskedWords: words },
            },
          },
          1 << 24,
        );
        void forger!.publishAsync(
          topics.secureFromVehicle('forged-0'),
          Buffer.from(bytes),
          { qos: 1 },
        );
      });
      const failed = new Promise<RoundFailedEvent>((resolve, reject) => {
        aggregator!.once('round-failed', resolve);
        aggregator!.once('round-closed', () =>
          reject(new Error('round closed with a forged input')),
        );
      });
      await aggregator.start();
      const event = await failed;

      assert.ok(task !== undefined);
      assert.ok(
        event.reasonCode === ErrorCode.ValueOutOfRange ||
          event.reasonCode === ErrorCode.UpdateNormTooLarge,
        `round failed with ${event.reasonCode}`,
      );
      assert.equal(event.modelVersion, 0);
      assert.equal(aggregator.currentModelVersion, 0);
    },
  );
});
