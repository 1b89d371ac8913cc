/**
 * Release helpers for tests that play the aggregator or a late
 * subscriber: build a chunked release from ONNX bytes, publish it
 * retained, and fetch the retained release back with its chunks.
 */
import { connectAsync, type MqttClient } from 'mqtt';
import { MODEL_NAME } from '../models/architecture.ts';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeModelRelease,
  decodeReleaseChunk,
  encodeReleaseChunk,
  type FleetTopics,
  type ModelRelease,
} from '../protocol/index.ts';
import {
  encodeRelease,
  type EncodedRelease,
} from '../aggregator/release-messages.ts';
import { endClient } from '../protocol/mqtt-end.ts';

/** A release notice with the ONNX file its chunks carry. */
export type FetchedRelease = ModelRelease & { onnx: Uint8Array };

/** Encodes the release of `onnx` as model `version`. */
export function buildChunkedRelease(
  onnx: Uint8Array,
  version: number,
  maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES,
): EncodedRelease {
  return encodeRelease(
    {
      modelName: MODEL_NAME,
      version,
      parentVersion: Math.max(version - 1, 0),
      round: version,
      createdAtMs: Date.now(),
      numVehicles: 0,
      numExamples: 0,
      testAccuracy: null,
    },
    onnx,
    maxMessageBytes,
  );
}

/** Encodes chunk `index` of `encoded` with one data byte flipped. */
export function encodeTamperedChunk(
  encoded: EncodedRelease,
  index: number,
): Uint8Array {
  const data = Uint8Array.from(decodeReleaseChunk(encoded.chunks[index]).data);
  data[data.length >> 1] ^= 0xff;
  const { modelName, version } = encoded.release;
  return encodeReleaseChunk({ modelName, version, index, data });
}

/** Publishes with QoS 1 and the retain flag. */
export async function publishRetained(
  client: MqttClient,
  topic: string,
  payload: Uint8Array,
): Promise<void> {
  await client.publishAsync(topic, Buffer.from(payload), {
    qos: 1,
    retain: true,
  });
}

/**
 * Publishes the chunks of `encoded` (those in `indices`, default all)
 * and then, unless `withNotice` is false, its notice; all retained.
 */
export async function publishChunkedRelease(
  client: MqttClient,
  topics: FleetTopics,
  encoded: EncodedRelease,
  options: { indices?: number[]; withNotice?: boolean } = {},
): Promise<void> {
  const { version } = encoded.release;
  const indices = options.indices ?? encoded.chunks.map((_, index) => index);
  for (const index of indices) {
    await publishRetained(
      client,
      topics.releaseChunk(version, index),
      encoded.chunks[index],
    );
  }
  if (options.withNotice !== false) {
    await publishRetained(client, topics.release(), encoded.notice);
  }
}

/**
 * Subscribes a fresh client to the release topic, then to the chunk
 * topics the retained notice lists, and returns the notice with the
 * joined file.
 */
export async function fetchChunkedRelease(
  port: number,
  topics: FleetTopics,
  timeoutMs = 10_000,
): Promise<FetchedRelease> {
  const client = await connectClient(port);
  try {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error('no complete retained release in time')),
        timeoutMs,
      );
    });
    const fetched = receiveRelease(client, topics);
    await client.subscribeAsync(topics.release(), { qos: 1 });
    try {
      return await Promise.race([fetched, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  } finally {
    await endClient(client, 2000);
  }
}

/** Waits for the retained notice, subscribes to its chunks, joins them. */
function receiveRelease(
  client: MqttClient,
  topics: FleetTopics,
): Promise<FetchedRelease> {
  return new Promise((resolve, reject) => {
    let release: ModelRelease | undefined;
    const chunks = new Map<number, Uint8Array>();
    client.on('message', (topic, payload, packet) => {
      try {
        if (topic === topics.release() && packet.retain && payload.length > 0) {
          release ??= decodeModelRelease(payload);
          const chunkTopics = release.chunkSha256.map((_, index) =>
            topics.releaseChunk(release!.version, index),
          );
          client.subscribeAsync(chunkTopics, { qos: 1 }).catch(reject);
          return;
        }
        const position = topics.releaseChunkOf(topic);
        if (release === undefined || position === undefined) return;
        if (payload.length === 0) return;
        chunks.set(position.index, decodeReleaseChunk(payload).data);
        if (chunks.size < release.chunkCount) return;
        const ordered = [...chunks.keys()].sort((a, b) => a - b);
        const onnx = Buffer.concat(ordered.map((index) => chunks.get(index)!));
        resolve({ ...release, onnx: new Uint8Array(onnx) });
      } catch (err) {
        reject(err);
      }
    });
  });
}

/**
 * Collects the retained messages on every chunk topic of the fleet for
 * `waitMs`; returns the non-empty ones as "v<version>/<index>" strings.
 */
export async function listRetainedChunks(
  port: number,
  topics: FleetTopics,
  waitMs = 500,
): Promise<string[]> {
  const client = await connectClient(port);
  const found = new Set<string>();
  client.on('message', (topic, payload) => {
    const position = topics.releaseChunkOf(topic);
    if (position !== undefined && payload.length > 0) {
      found.add(`v${position.version}/${position.index}`);
    }
  });
  await client.subscribeAsync(`${topics.prefix}/releases/+/chunks/+`, {
    qos: 1,
  });
  await new Promise((resolve) => setTimeout(resolve, waitMs));
  await endClient(client, 2000);
  return [...found].sort();
}

/** Connects a plain MQTT 3.1.1 client to the broker on `port`. */
export function connectClient(
  port: number,
  clientId = `test-${Math.random().toString(16).slice(2)}`,
): Promise<MqttClient> {
  return connectAsync(`mqtt://127.0.0.1:${port}`, {
    protocolVersion: 4,
    clientId,
    reconnectPeriod: 0,
  });
}
