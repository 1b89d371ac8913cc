import assert from 'node:assert/strict';
import { once, type EventEmitter } from 'node:events';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createServer, connect as connectTcp, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import type { MqttClient } from 'mqtt';
import { pino } from 'pino';

import { Aggregator } from '../aggregator/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { MODEL_NAME, type WeightMap } from '../models/architecture.ts';
import {
  exportOnnx,
  loadLabelledImages,
  resolveDataDir,
  sha256Hex,
  type LabelledImages,
} from '../models/index.ts';
import { readWeightsFile } from '../models/weights-file.ts';
import {
  ErrorCode,
  FleetError,
  FleetTopics,
  createLogger,
  decodeModelRelease,
  decodeReleaseChunk,
  encodeModelRelease,
  encodeReleaseChunk,
  type Logger,
} from '../protocol/index.ts';
import { VehicleAgent, type AgentEvents } from '../vehicle-agent/index.ts';
import { MAX_CHUNK_ATTEMPTS } from '../vehicle-agent/release-download.ts';
import {
  buildChunkedRelease,
  connectClient,
  encodeTamperedChunk,
  fetchChunkedRelease,
  publishChunkedRelease,
  publishRetained,
} from './release-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BASE_WEIGHTS = path.join(
  REPOSITORY_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
/** Splits the base model's ONNX file (about 640 KB) into 5 chunks. */
const MAX_MESSAGE_BYTES = 128 * 1024;
const EVENT_TIMEOUT_MS = 30_000;
const silent = createLogger({ level: 'silent' });

/** Pino logger that keeps every line in memory, for log assertions. */
function captureLogger(onLine?: (line: Record<string, unknown>) => void): {
  log: Logger;
  lines: Record<string, unknown>[];
} {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      const line = JSON.parse(String(chunk)) as Record<string, unknown>;
      lines.push(line);
      onLine?.(line);
      done();
    },
  });
  return { log: pino({ level: 'debug' }, stream), lines };
}

function waitForEvent<K extends keyof AgentEvents>(
  agent: EventEmitter<AgentEvents>,
  name: K,
): Promise<AgentEvents[K]> {
  return once(agent as EventEmitter, name, {
    signal: AbortSignal.timeout(EVENT_TIMEOUT_MS),
  }) as Promise<AgentEvents[K]>;
}

/** Polls `condition` every 20 ms until it is true or `timeoutMs` passes. */
async function waitUntil(
  condition: () => boolean,
  what: string,
  timeoutMs = EVENT_TIMEOUT_MS,
): Promise<void> {
  const stopAt = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > stopAt) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Copy of `weights` with every dense value shifted; conv layers equal. */
function shiftDense(weights: WeightMap, shift: number): WeightMap {
  const next: WeightMap = new Map();
  for (const [name, values] of weights) {
    const copy = Float32Array.from(values);
    if (name.startsWith('dense'))
      for (let i = 0; i < copy.length; i++) copy[i] += shift;
    next.set(name, copy);
  }
  return next;
}

/**
 * TCP proxy in front of the broker; `cut()` drops every connection, as a
 * tunnel would, while new connections still get through.
 */
async function startProxy(targetPort: number): Promise<{
  port: number;
  cut(): void;
  close(): Promise<void>;
}> {
  const sockets = new Set<Socket>();
  const server = createServer((inbound) => {
    const outbound = connectTcp(targetPort, '127.0.0.1');
    for (const socket of [inbound, outbound]) {
      sockets.add(socket);
      socket.on('error', () => socket.destroy());
      socket.on('close', () => {
        sockets.delete(socket);
        inbound.destroy();
        outbound.destroy();
      });
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise<void>((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve()),
  );
  const address = server.address();
  const port =
    typeof address === 'object' && address !== null ? address.port : 0;
  const cut = (): void => {
    for (const socket of sockets) socket.destroy();
  };
  return {
    port,
    cut,
    close: async () => {
      cut();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

describe('release chunk messages', () => {
  const onnx = exportOnnx(readWeightsFile(BASE_WEIGHTS));

  test('chunks fill max message bytes', () => {
    const encoded = buildChunkedRelease(onnx, 4, MAX_MESSAGE_BYTES);

    const parts = encoded.chunks.map(decodeReleaseChunk);
    const joined = Buffer.concat(parts.map((chunk) => chunk.data));

    assert.ok(encoded.chunks.length >= 3, `${encoded.chunks.length} chunks`);
    assert.equal(encoded.release.chunkCount, encoded.chunks.length);
    for (const chunk of encoded.chunks) {
      assert.ok(chunk.byteLength <= MAX_MESSAGE_BYTES);
    }
    assert.ok(encoded.chunks[0].byteLength > MAX_MESSAGE_BYTES - 64);
    assert.ok(encoded.notice.byteLength <= MAX_MESSAGE_BYTES);
    assert.deepEqual(
      parts.map((chunk) => chunk.index),
      parts.map((_, index) => index),
    );
    assert.equal(sha256Hex(joined), encoded.release.sha256);
    assert.deepEqual(
      encoded.release.chunkSha256,
      parts.map((chunk) => sha256Hex(chunk.data)),
    );
  });

  test('notice decode rejects wrong count', () => {
    const { release } = buildChunkedRelease(onnx, 4, MAX_MESSAGE_BYTES);
    const bytes = encodeModelRelease({
      ...release,
      chunkCount: release.chunkCount + 1,
    });

    assert.throws(
      () => decodeModelRelease(bytes),
      (err) =>
        err instanceof FleetError && err.code === ErrorCode.MalformedPayload,
    );
  });

  test('notice decode rejects missing digest', () => {
    const { release } = buildChunkedRelease(onnx, 4, MAX_MESSAGE_BYTES);
    const bytes = encodeModelRelease({
      ...release,
      chunkSha256: release.chunkSha256.slice(1),
    });

    assert.throws(
      () => decodeModelRelease(bytes),
      (err) =>
        err instanceof FleetError && err.code === ErrorCode.MalformedPayload,
    );
  });

  test('chunk decode rejects empty data', () => {
    const bytes = encodeReleaseChunk({
      modelName: MODEL_NAME,
      version: 1,
      index: 0,
      data: new Uint8Array(0),
    });

    assert.throws(
      () => decodeReleaseChunk(bytes),
      (err) =>
        err instanceof FleetError && err.code === ErrorCode.MalformedPayload,
    );
  });

  test('oversized chunk is not encoded', () => {
    assert.throws(
      () =>
        encodeReleaseChunk(
          { modelName: MODEL_NAME, version: 1, index: 0, data: onnx },
          MAX_MESSAGE_BYTES,
        ),
      (err) =>
        err instanceof FleetError && err.code === ErrorCode.PayloadTooLarge,
    );
  });

  test('chunk topics build and parse', () => {
    const topics = new FleetTopics('fleet-a');

    const topic = topics.releaseChunk(12, 3);

    assert.equal(topic, 'fleet/v1/fleet-a/releases/v12/chunks/3');
    assert.deepEqual(topics.releaseChunkOf(topic), { version: 12, index: 3 });
    assert.equal(topics.releaseChunkOf(topics.release()), undefined);
    assert.equal(
      topics.releaseChunkOf('fleet/v1/other/releases/v1/chunks/0'),
      undefined,
    );
    assert.throws(() => topics.releaseChunk(-1, 0), RangeError);
    assert.throws(() => topics.releaseChunk(1, 0.5), RangeError);
  });
});

describe('chunked release delivery', () => {
  const baseWeights = readWeightsFile(BASE_WEIGHTS);
  const onnxV0 = exportOnnx(baseWeights);
  const onnxV1 = exportOnnx(shiftDense(baseWeights, 0.01));
  const onnxV2 = exportOnnx(shiftDense(baseWeights, 0.02));
  let broker: RunningBroker;
  /** Topics each client id subscribed to, from the broker's debug log. */
  const subscriptions = new Map<string, string[]>();
  let frames: LabelledImages;
  let workDir: string;
  const agents: VehicleAgent[] = [];
  const clients: MqttClient[] = [];
  let fleetCount = 0;
  /** Digest of the release the aggregator of the first test published. */
  let aggregatorSha256 = '';

  /** Topics of a fleet that no other test uses. */
  function newFleet(): FleetTopics {
    fleetCount += 1;
    return new FleetTopics(`chunk-fleet-${fleetCount}`);
  }

  function subscribedChunks(clientId: string, topics: FleetTopics): number[] {
    return (subscriptions.get(clientId) ?? [])
      .map((topic) => topics.releaseChunkOf(topic)?.index)
      .filter((index) => index !== undefined);
  }

  function createAgent(
    topics: FleetTopics,
    options: { vehicleId?: string; port?: number; log?: Logger } = {},
  ): VehicleAgent {
    const vehicleId = options.vehicleId ?? 'veh-1';
    const agent = new VehicleAgent({
      vehicleId,
      fleetId: topics.fleetId,
      brokerUrl: `mqtt://127.0.0.1:${options.port ?? broker.port}`,
      stateDir: path.join(workDir, topics.fleetId, vehicleId),
      frames,
      maxMessageBytes: MAX_MESSAGE_BYTES,
      log: options.log ?? silent,
    });
    agents.push(agent);
    return agent;
  }

  async function fleetClient(): Promise<MqttClient> {
    const client = await connectClient(broker.port);
    clients.push(client);
    return client;
  }

  function downloadDirs(topics: FleetTopics, vehicleId = 'veh-1'): string[] {
    const dir = path.join(workDir, topics.fleetId, vehicleId, 'downloads');
    return existsSync(dir) ? readdirSync(dir) : [];
  }

  before(async () => {
    workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-chunks-'));
    frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: 100,
    });
    // The broker logs every SUBSCRIBE at debug with the client id.
    const brokerLog = captureLogger((line) => {
      if (line.msg !== 'client subscribed') return;
      const clientId = String(line.clientId);
      const list = subscriptions.get(clientId) ?? [];
      list.push(...(line.topics as string[]));
      subscriptions.set(clientId, list);
    });
    broker = await startBroker({ port: 0, log: brokerLog.log });
  });

  after(async () => {
    for (const agent of agents) await agent.stop();
    for (const client of clients) await endClient(client, 2000);
    await broker.close();
    rmSync(workDir, { recursive: true, force: true });
  });

  test('aggregator release reaches agent', async () => {
    const topics = newFleet();
    const agent = createAgent(topics);
    const connected = waitForEvent(agent, 'connected');
    await agent.start();
    await connected;
    const deployed = waitForEvent(agent, 'release-deployed');
    // Five vehicles never come online, so no round opens.
    const aggregator = new Aggregator({
      fleetId: topics.fleetId,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, topics.fleetId, 'aggregator'),
      baseWeightsPath: BASE_WEIGHTS,
      maxMessageBytes: MAX_MESSAGE_BYTES,
      minUpdates: 5,
      minVehiclesOnline: 5,
      log: silent,
    });

    try {
      await aggregator.start();
      const [event] = await deployed;
      const fetched = await fetchChunkedRelease(broker.port, topics);
      aggregatorSha256 = fetched.sha256;
      const receivedBefore = agent.releaseDownloads.chunksReceived;
      const client = await fleetClient();
      // Not retained, so the broker's copy stays intact for the next test.
      await client.publishAsync(
        topics.releaseChunk(0, 0),
        Buffer.from(buildChunkedRelease(onnxV0, 0).chunks[0]),
        { qos: 1 },
      );
      await delay(300);

      assert.ok(fetched.chunkCount >= 3, `${fetched.chunkCount} chunks`);
      assert.equal(fetched.version, 0);
      assert.equal(sha256Hex(fetched.onnx), fetched.sha256);
      assert.equal(event.version, 0);
      assert.equal(event.sha256, fetched.sha256);
      assert.equal(agent.deployedVersion, 0);
      const counts = agent.releaseDownloads;
      assert.equal(counts.chunksStored, fetched.chunkCount);
      assert.equal(counts.chunksRejected, 0);
      assert.equal(counts.chunkSubscriptions, fetched.chunkCount);
      assert.deepEqual(downloadDirs(topics), []);
      // The agent unsubscribed, so a chunk published again does not reach it.
      assert.equal(agent.releaseDownloads.chunksReceived, receivedBefore);
    } finally {
      await aggregator.stop();
    }
  });

  test('late joiner gets current release', async () => {
    const topics = new FleetTopics(`chunk-fleet-${fleetCount}`);
    const agent = createAgent(topics, { vehicleId: 'veh-late' });
    const deployed = waitForEvent(agent, 'release-deployed');

    await agent.start();
    const [event] = await deployed;

    assert.equal(event.version, 0);
    assert.equal(event.sha256, aggregatorSha256);
    assert.equal(agent.deployedVersion, 0);
    assert.ok(agent.releaseDownloads.chunksStored >= 3);
  });

  test('too small max bytes rejected', async () => {
    const topics = newFleet();
    const options = {
      fleetId: topics.fleetId,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, topics.fleetId, 'aggregator'),
      baseWeightsPath: BASE_WEIGHTS,
      log: silent,
    };
    const aggregator = new Aggregator({ ...options, maxMessageBytes: 1024 });

    await assert.rejects(aggregator.start(), (err) => {
      assert.ok(err instanceof FleetError);
      assert.equal(err.code, ErrorCode.InvalidConfig);
      assert.match(err.message, /maxMessageBytes 1024/);
      assert.match(err.message, /use at least \d+/);
      return true;
    });
    await aggregator.stop();
    assert.throws(
      () => new Aggregator({ ...options, maxMessageBytes: 512 }),
      (err) =>
        err instanceof FleetError && err.code === ErrorCode.InvalidConfig,
    );
  });

  test('disconnect resumes missing chunks', async () => {
    const topics = newFleet();
    const release = buildChunkedRelease(onnxV0, 0, MAX_MESSAGE_BYTES);
    const count = release.chunks.length;
    const client = await fleetClient();
    await publishChunkedRelease(client, topics, release, { indices: [0, 1] });
    const proxy = await startProxy(broker.port);
    const agent = createAgent(topics, { port: proxy.port });
    const clientId = 'vehicle-veh-1';

    try {
      await agent.start();
      await waitUntil(
        () => agent.releaseDownloads.chunksStored === 2,
        'the first two chunks',
      );
      await delay(200);
      const before = subscribedChunks(clientId, topics).length;
      const reconnected = waitForEvent(agent, 'connected');
      proxy.cut();
      const rest = release.chunks.map((_, index) => index).slice(2);
      await publishChunkedRelease(client, topics, release, {
        indices: rest,
        withNotice: false,
      });
      const deployed = waitForEvent(agent, 'release-deployed');
      await reconnected;
      const [event] = await deployed;

      assert.equal(event.version, 0);
      assert.equal(agent.deployedVersion, 0);
      // Before the cut: chunks 0-3 (four in flight), then 4 after 0 and 1.
      assert.deepEqual(
        subscribedChunks(clientId, topics).slice(0, before),
        [0, 1, 2, 3, 4].slice(0, Math.min(count, 5)),
      );
      // After the reconnection only missing chunks were requested. The
      // persistent session may deliver them before the agent asks again,
      // and then the agent requests none.
      const again = subscribedChunks(clientId, topics).slice(before);
      assert.ok(
        again.every((index) => rest.includes(index)),
        `chunks requested again: ${again.join(', ')}`,
      );
      assert.equal(agent.releaseDownloads.chunksStored, count);
      assert.equal(agent.releaseDownloads.chunksRejected, 0);
      assert.deepEqual(downloadDirs(topics), []);
    } finally {
      await agent.stop();
      await proxy.close();
    }
  });

  test('restart resumes missing chunks', async () => {
    const topics = newFleet();
    const release = buildChunkedRelease(onnxV0, 0, MAX_MESSAGE_BYTES);
    const count = release.chunks.length;
    const client = await fleetClient();
    await publishChunkedRelease(client, topics, release, { indices: [0, 1] });
    const first = createAgent(topics);
    await first.start();
    await waitUntil(
      () => first.releaseDownloads.chunksStored === 2,
      'the first two chunks',
    );
    await first.stop();
    const clientId = 'vehicle-veh-1';
    subscriptions.delete(clientId);

    const rest = release.chunks.map((_, index) => index).slice(2);
    await publishChunkedRelease(client, topics, release, {
      indices: rest,
      withNotice: false,
    });
    const captured = captureLogger();
    const second = createAgent(topics, { log: captured.log });
    const deployed = waitForEvent(second, 'release-deployed');
    await second.start();
    await deployed;

    assert.equal(second.deployedVersion, 0);
    assert.deepEqual(subscribedChunks(clientId, topics).sort(), rest);
    assert.equal(second.releaseDownloads.chunksStored, count - 2);
    const resumed = captured.lines.find(
      (line) => line.msg === 'release download resumed',
    );
    assert.equal(resumed?.storedChunks, 2);
    const fetchedAgain = captured.lines.filter(
      (line) =>
        line.msg === 'release chunk stored' &&
        [0, 1].includes(line.index as number),
    );
    assert.deepEqual(fetchedAgain, []);
  });

  test('tampered chunk keeps current model', async () => {
    const topics = newFleet();
    const client = await fleetClient();
    await publishChunkedRelease(
      client,
      topics,
      buildChunkedRelease(onnxV0, 0, MAX_MESSAGE_BYTES),
    );
    const captured = captureLogger();
    const agent = createAgent(topics, { log: captured.log });
    const firstDeployed = waitForEvent(agent, 'release-deployed');
    await agent.start();
    await firstDeployed;
    const before = agent.releaseDownloads;

    const v1 = buildChunkedRelease(onnxV1, 1, MAX_MESSAGE_BYTES);
    await publishChunkedRelease(client, topics, v1, { withNotice: false });
    await publishRetained(
      client,
      topics.releaseChunk(1, 1),
      encodeTamperedChunk(v1, 1),
    );
    const rejected = waitForEvent(agent, 'release-rejected');
    await publishRetained(client, topics.release(), v1.notice);
    const [event] = await rejected;

    assert.equal(event.version, 1);
    assert.equal(event.code, ErrorCode.DigestMismatch);
    assert.equal(agent.deployedVersion, 0);
    const after = agent.releaseDownloads;
    assert.equal(
      after.chunksRejected - before.chunksRejected,
      MAX_CHUNK_ATTEMPTS,
    );
    assert.equal(
      after.chunksStored - before.chunksStored,
      v1.chunks.length - 1,
    );
    const probabilities = await agent.classify(
      frames.images.subarray(0, 3072),
      1,
    );
    assert.equal(probabilities.length, 43);
    const warnings = captured.lines.filter(
      (line) => line.msg === 'release chunk rejected',
    );
    assert.equal(warnings.length, MAX_CHUNK_ATTEMPTS);
    for (const warning of warnings) {
      assert.equal(warning.level, 40);
      assert.equal(warning.vehicleId, 'veh-1');
      assert.equal(warning.modelVersion, 1);
      assert.equal(warning.index, 1);
      assert.equal(warning.code, ErrorCode.DigestMismatch);
    }
  });

  test('superseded download is deleted', async () => {
    const topics = newFleet();
    const client = await fleetClient();
    const v1 = buildChunkedRelease(onnxV1, 1, MAX_MESSAGE_BYTES);
    await publishChunkedRelease(client, topics, v1, { indices: [0] });
    const agent = createAgent(topics);
    await agent.start();
    await waitUntil(
      () => agent.releaseDownloads.chunksStored === 1,
      'the first chunk',
    );
    const partial = downloadDirs(topics);

    const deployed = waitForEvent(agent, 'release-deployed');
    await publishChunkedRelease(
      client,
      topics,
      buildChunkedRelease(onnxV2, 2, MAX_MESSAGE_BYTES),
    );
    const [event] = await deployed;

    assert.deepEqual(partial, [`${MODEL_NAME}-v1`]);
    assert.equal(event.version, 2);
    assert.equal(agent.deployedVersion, 2);
    await waitUntil(() => downloadDirs(topics).length === 0, 'no downloads');
  });
});
