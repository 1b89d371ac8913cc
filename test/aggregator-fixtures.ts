/**
 * Shared pieces of the aggregator tests: a real broker on port 0, vehicles
 * that are plain MQTT clients publishing encoded updates, and random base
 * weights on disk.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, type MqttClient } from 'mqtt';
import {
  FleetTopics,
  VehicleState,
  createLogger,
  decodeRoundTask,
  decodeUpdateAck,
  encodeFloat32Tensor,
  encodeVehicleStatus,
  type ModelUpdate,
  type RoundTask,
  type UpdateAck,
  type WireTensor,
} from '../protocol/index.ts';
import {
  MODEL_NAME,
  TENSOR_SPECS,
  type WeightMap,
} from '../models/architecture.ts';
import { loadLabelledImages, resolveDataDir } from '../models/index.ts';
import { initializeWeights } from '../models/weight-init.ts';
import { writeWeightsFile } from '../models/weights-file.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import type { AggregatorOptions } from '../aggregator/index.ts';
import {
  fetchChunkedRelease,
  type FetchedRelease,
} from './release-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

export const FLEET_ID = 'test-fleet';
export const topics = new FleetTopics(FLEET_ID);
export const quietLog = createLogger({
  level: process.env.TEST_LOG_LEVEL ?? 'silent',
});

/** A temporary directory with random base weights in it. */
export interface Workspace {
  dir: string;
  baseWeightsPath: string;
  baseWeights: WeightMap;
  remove(): void;
}

export function createWorkspace(seed = 7): Workspace {
  const dir = mkdtempSync(join(tmpdir(), 'fleetlearn-aggregator-'));
  const baseWeights = initializeWeights(seed);
  const baseWeightsPath = join(dir, 'base.weights.pb');
  writeWeightsFile(baseWeightsPath, baseWeights, {
    modelName: MODEL_NAME,
    version: 0,
  });
  return {
    dir,
    baseWeightsPath,
    baseWeights,
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** Probe batch and a small test split of real images. */
export interface RealImages {
  probeImages: Float32Array;
  probeCount: number;
  testSet: { images: Float32Array; labels: Int32Array };
}

let cachedImages: Promise<RealImages> | undefined;

export function loadRealImages(): Promise<RealImages> {
  cachedImages ??= (async () => {
    const dir = resolveDataDir();
    const probe = await loadLabelledImages(dir, { split: 'test', limit: 8 });
    const test = await loadLabelledImages(dir, { split: 'test', limit: 200 });
    return {
      probeImages: probe.images,
      probeCount: probe.count,
      testSet: { images: test.images, labels: test.labels },
    };
  })();
  return cachedImages;
}

/** Aggregator options for tests: short timeouts, quiet logs. */
export function testOptions(
  broker: RunningBroker,
  workspace: Workspace,
  images: RealImages,
  overrides: Partial<AggregatorOptions> = {},
): AggregatorOptions {
  return {
    fleetId: FLEET_ID,
    brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
    stateDir: join(workspace.dir, 'state'),
    baseWeightsPath: workspace.baseWeightsPath,
    roundTimeoutMs: 10_000,
    onlineWaitTimeoutMs: 10_000,
    maxRounds: 1,
    probeImages: images.probeImages,
    probeCount: images.probeCount,
    log: quietLog,
    ...overrides,
  };
}

export async function startTestBroker(): Promise<RunningBroker> {
  return startBroker({ port: 0, log: quietLog });
}

/** Values queued by arrival, handed out to waiters in order. */
class Inbox<T> {
  readonly #items: T[] = [];
  readonly #waiters: Array<(item: T) => void> = [];

  push(item: T): void {
    const waiter = this.#waiters.shift();
    if (waiter === undefined) this.#items.push(item);
    else waiter(item);
  }

  next(what: string, timeoutMs = 20_000): Promise<T> {
    const item = this.#items.shift();
    if (item !== undefined) return Promise.resolve(item);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(onItem), 1);
        reject(
          new Error(`timed out after ${timeoutMs} ms waiting for ${what}`),
        );
      }, timeoutMs);
      const onItem = (value: T): void => {
        clearTimeout(timer);
        resolve(value);
      };
      this.#waiters.push(onItem);
    });
  }
}

/**
 * Stand-in for a vehicle agent: an MQTT client that publishes a retained
 * status, receives round tasks and acks, and publishes updates.
 */
export class TestVehicle {
  readonly id: string;
  readonly client: MqttClient;
  readonly #acks = new Inbox<UpdateAck>();
  readonly #tasks = new Inbox<RoundTask>();

  private constructor(id: string, client: MqttClient) {
    this.id = id;
    this.client = client;
    client.on('message', (topic, payload) => {
      if (topic === topics.ack(id)) this.#acks.push(decodeUpdateAck(payload));
      if (topic === topics.roundTask())
        this.#tasks.push(decodeRoundTask(payload));
    });
  }

  /** Connects; `isOnline` publishes a retained ONLINE status. */
  static async connect(
    broker: RunningBroker,
    id: string,
    isOnline = true,
  ): Promise<TestVehicle> {
    const client = connect(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
      clientId: `vehicle-${id}`,
      reconnectPeriod: 0,
    });
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => resolve());
      client.once('error', reject);
    });
    const vehicle = new TestVehicle(id, client);
    await client.subscribeAsync([topics.ack(id), topics.roundTask()], {
      qos: 1,
    });
    if (isOnline) {
      const status = encodeVehicleStatus({
        vehicleId: id,
        state: VehicleState.Online,
        modelName: MODEL_NAME,
        modelVersion: 0,
        numExamples: 100,
        updatedAtMs: Date.now(),
        connectionId: 0,
        backend: 'test',
      });
      await client.publishAsync(topics.status(id), Buffer.from(status), {
        qos: 1,
        retain: true,
      });
    }
    return vehicle;
  }

  nextAck(timeoutMs?: number): Promise<UpdateAck> {
    return this.#acks.next(`an ack for ${this.id}`, timeoutMs);
  }

  nextTask(timeoutMs?: number): Promise<RoundTask> {
    return this.#tasks.next(`a round task for ${this.id}`, timeoutMs);
  }

  async publish(payload: Uint8Array): Promise<void> {
    await this.client.publishAsync(
      topics.update(this.id),
      Buffer.from(payload),
      {
        qos: 1,
      },
    );
  }

  /** Publishes `payload` and returns the aggregator's ack. */
  async send(payload: Uint8Array): Promise<UpdateAck> {
    const ack = this.nextAck();
    await this.publish(payload);
    return ack;
  }

  async close(): Promise<void> {
    await endClient(this.client, 2000);
  }
}

/** Tensor shape by name, from the architecture. */
export function shapeOf(name: string): number[] {
  const spec = TENSOR_SPECS.find((candidate) => candidate.name === name);
  if (spec === undefined) throw new RangeError(`no tensor ${name}`);
  return spec.shape;
}

/** Delta tensors for `names`, element i of tensor t = value(t, i). */
export function buildDeltas(
  names: readonly string[],
  value: (name: string, index: number) => number,
): WireTensor[] {
  return names.map((name) => {
    const shape = shapeOf(name);
    const values = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < values.length; i++) values[i] = value(name, i);
    return encodeFloat32Tensor(name, shape, values);
  });
}

/** Builds a valid update for `task` from `vehicleId`, with overrides. */
export function buildUpdate(
  vehicleId: string,
  task: RoundTask,
  options: {
    numExamples?: number;
    value?: (name: string, index: number) => number;
    overrides?: Partial<ModelUpdate>;
  } = {},
): ModelUpdate {
  const value = options.value ?? (() => 0.01);
  return {
    updateId: `${vehicleId}-r${task.round}`,
    vehicleId,
    modelName: task.modelName,
    baseModelVersion: task.modelVersion,
    round: task.round,
    numExamples: options.numExamples ?? 10,
    deltas: buildDeltas(task.training.trainableTensors, value),
    metrics: {
      trainLoss: 1,
      trainAccuracy: 0.5,
      trainDurationMs: 10,
      backend: 'test',
    },
    createdAtMs: Date.now(),
    ...options.overrides,
  };
}

/**
 * Subscribes a fresh client to the release topic and the chunk topics it
 * lists; returns the retained release notice with the joined ONNX file.
 */
export function fetchRetainedRelease(
  broker: RunningBroker,
  timeoutMs = 10_000,
): Promise<FetchedRelease> {
  return fetchChunkedRelease(broker.port, topics, timeoutMs);
}
