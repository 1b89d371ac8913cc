import assert from 'node:assert/strict';
import type { EventEmitter } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import type { MqttClient } from 'mqtt';

import {
  encodeRelease,
  type EncodedRelease,
} from '../aggregator/release-messages.ts';
import { ReleaseSigner } from '../aggregator/release-signer.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { MODEL_NAME, type WeightMap } from '../models/architecture.ts';
import {
  OnnxClassifier,
  exportOnnx,
  loadLabelledImages,
  readWeightsFile,
  resolveDataDir,
  sha256Hex,
} from '../models/index.ts';
import {
  ErrorCode,
  FleetTopics,
  decodeReleaseChunk,
  decodeSignedRelease,
  encodeModelRelease,
  encodeReleaseChunk,
  encodeSignedRelease,
  type ModelRelease,
} from '../protocol/index.ts';
import {
  VehicleAgent,
  type AgentEvents,
  type ReleaseRejectedEvent,
} from '../vehicle-agent/index.ts';
import { connectClient, publishRetained } from './release-fixtures.ts';
import {
  createKeyFolder,
  type KeyFolder,
  type TestKey,
} from './signing-fixtures.ts';
import { captureLog, type CapturedLog } from './tls-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BASE_WEIGHTS = path.join(
  REPOSITORY_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const FLEET_ID = 'signed-fleet';
const VEHICLE_ID = 'veh-signed';
/** Splits the base model's ONNX file (about 640 KB) into 3 chunks. */
const MAX_MESSAGE_BYTES = 256 * 1024;
const EVENT_TIMEOUT_MS = 30_000;
const topics = new FleetTopics(FLEET_ID);

/** Resolves with the first `name` event of `agent` that passes `accept`. */
function nextEvent<K extends keyof AgentEvents>(
  agent: VehicleAgent,
  name: K,
  accept: (payload: AgentEvents[K][0]) => boolean = () => true,
): Promise<AgentEvents[K][0]> {
  const emitter = agent as EventEmitter;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(name, listener);
      reject(new Error(`no matching ${name} event in ${EVENT_TIMEOUT_MS} ms`));
    }, EVENT_TIMEOUT_MS);
    const listener = (payload: AgentEvents[K][0]): void => {
      if (!accept(payload)) return;
      clearTimeout(timer);
      emitter.off(name, listener);
      resolve(payload);
    };
    emitter.on(name, listener);
  });
}

/** Base weights with every dense value shifted by `shift`. */
function shifted(base: WeightMap, shift: number): WeightMap {
  const next: WeightMap = new Map();
  for (const [name, values] of base) {
    const copy = Float32Array.from(values);
    if (name.startsWith('dense')) {
      for (let i = 0; i < copy.length; i++) copy[i] += shift;
    }
    next.set(name, copy);
  }
  return next;
}

function encodeVersion(onnx: Uint8Array, version: number): EncodedRelease {
  return encodeRelease(
    {
      modelName: MODEL_NAME,
      version,
      parentVersion: Math.max(version - 1, 0),
      round: version,
      createdAtMs: Date.now(),
      numVehicles: 1,
      numExamples: 100,
      testAccuracy: 0,
    },
    onnx,
    MAX_MESSAGE_BYTES,
  );
}

/** Publishes the chunks of `encoded`, then `notice`, all retained. */
async function publishRelease(
  client: MqttClient,
  encoded: EncodedRelease,
  notice: Uint8Array,
  chunks: Uint8Array[] = encoded.chunks,
): Promise<void> {
  const { version } = encoded.release;
  for (const [index, chunk] of chunks.entries()) {
    await publishRetained(client, topics.releaseChunk(version, index), chunk);
  }
  await publishRetained(client, topics.release(), notice);
}

/**
 * Builds the forged release of `encoded`: one byte of chunk 0 flipped,
 * the notice digests recomputed to match, and the signature of
 * `genuineNotice`.
 */
function tamperChunkKeepSignature(
  encoded: EncodedRelease,
  genuineNotice: Uint8Array,
): { chunks: Uint8Array[]; notice: Uint8Array } {
  const data = Uint8Array.from(decodeReleaseChunk(encoded.chunks[0]).data);
  data[data.length >> 1] ^= 0x01;
  const { modelName, version } = encoded.release;
  const chunks = [
    encodeReleaseChunk({ modelName, version, index: 0, data }),
    ...encoded.chunks.slice(1),
  ];
  const parts = chunks.map((chunk) => decodeReleaseChunk(chunk).data);
  const envelope = decodeSignedRelease(genuineNotice)!;
  const forged: ModelRelease = {
    ...encoded.release,
    releaseSequence: Number.MAX_SAFE_INTEGER,
    sha256: sha256Hex(Buffer.concat(parts)),
    chunkSha256: parts.map((part) => sha256Hex(part)),
  };
  const notice = encodeSignedRelease({
    ...envelope,
    signedBytes: encodeModelRelease(forged),
  });
  return { chunks, notice };
}

describe('signed releases on the vehicle', () => {
  let broker: RunningBroker;
  let client: MqttClient;
  let keys: KeyFolder;
  let fleetKey: TestKey;
  let strangerKey: TestKey;
  let signer: ReleaseSigner;
  let workDir: string;
  let captured: CapturedLog;
  let agent: VehicleAgent;
  let onnx: Uint8Array[];
  let images: Float32Array;
  let servedV1: Float32Array;
  let noticeV0: Uint8Array;
  let releaseV2: EncodedRelease;
  let noticeV2: Uint8Array;
  let chunksStoredBefore: number;

  /** Publishes `notice` and waits for the agent to reject it with `code`. */
  async function expectRejected(
    publish: () => Promise<void>,
    code: string,
  ): Promise<ReleaseRejectedEvent> {
    const rejected = nextEvent(agent, 'release-rejected');
    await publish();
    const event = await rejected;
    assert.equal(event.code, code);
    assert.equal(agent.deployedVersion, 1);
    assert.deepEqual(await agent.classify(images, 4), servedV1);
    return event;
  }

  before(async () => {
    workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-signed-'));
    keys = createKeyFolder();
    fleetKey = keys.createKey('fleet');
    strangerKey = keys.createKey('stranger');
    captured = captureLog();
    signer = new ReleaseSigner(
      fleetKey.signer,
      path.join(workDir, 'aggregator'),
      captured.log,
    );
    broker = await startBroker({ port: 0, log: captured.log });
    client = await connectClient(broker.port);

    const base = readWeightsFile(BASE_WEIGHTS);
    onnx = [0, 0.01, 0.02].map((shift) => exportOnnx(shifted(base, shift)));
    const frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: 40,
    });
    images = frames.images.subarray(0, 4 * 32 * 32 * 3);
    const classifier = await OnnxClassifier.create(onnx[1]);
    servedV1 = await classifier.predict(images, 4);
    await classifier.close();

    agent = new VehicleAgent({
      vehicleId: VEHICLE_ID,
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, 'vehicle'),
      frames,
      trustedReleaseKeysPath: keys.writePublicKeys('trusted.json', [fleetKey]),
      log: captured.log,
    });
    await agent.start();

    const releaseV0 = encodeVersion(onnx[0], 0);
    noticeV0 = signer.sign(releaseV0.release, MAX_MESSAGE_BYTES).notice;
    const deployedV0 = nextEvent(agent, 'release-deployed');
    await publishRelease(client, releaseV0, noticeV0);
    assert.equal((await deployedV0).version, 0);

    const releaseV1 = encodeVersion(onnx[1], 1);
    const deployedV1 = nextEvent(agent, 'release-deployed');
    await publishRelease(
      client,
      releaseV1,
      signer.sign(releaseV1.release, MAX_MESSAGE_BYTES).notice,
    );
    assert.equal((await deployedV1).version, 1);

    // Signed now, published only by the last test.
    releaseV2 = encodeVersion(onnx[2], 2);
    noticeV2 = signer.sign(releaseV2.release, MAX_MESSAGE_BYTES).notice;
    chunksStoredBefore = agent.releaseDownloads.chunksStored;
  });

  after(async () => {
    await agent?.stop();
    if (client !== undefined) await endClient(client, 2000);
    await broker?.close();
    keys?.remove();
    rmSync(workDir, { recursive: true, force: true });
  });

  test('tampered chunk with old signature rejected', async () => {
    const forged = tamperChunkKeepSignature(releaseV2, noticeV2);

    await expectRejected(
      () => publishRelease(client, releaseV2, forged.notice, forged.chunks),
      ErrorCode.InvalidSignature,
    );
  });

  test('flipped manifest byte rejected', async () => {
    const envelope = decodeSignedRelease(noticeV2)!;
    const manifest = Uint8Array.from(envelope.signedBytes);
    manifest[manifest.length >> 1] ^= 0x01;
    const notice = encodeSignedRelease({ ...envelope, signedBytes: manifest });

    await expectRejected(
      () => publishRelease(client, releaseV2, notice),
      ErrorCode.InvalidSignature,
    );
  });

  test('unsigned release rejected', async () => {
    await expectRejected(
      () => publishRelease(client, releaseV2, releaseV2.notice),
      ErrorCode.NotSigned,
    );
  });

  test('replayed older release rejected', async () => {
    const event = await expectRejected(
      () => publishRetained(client, topics.release(), noticeV0),
      ErrorCode.ReleaseReplayed,
    );

    assert.equal(event.version, 0);
  });

  test('unknown key rejected', async () => {
    const stranger = new ReleaseSigner(
      strangerKey.signer,
      path.join(workDir, 'stranger'),
      captured.log,
    );
    const notice = stranger.sign(releaseV2.release, MAX_MESSAGE_BYTES).notice;

    await expectRejected(
      () => publishRelease(client, releaseV2, notice),
      ErrorCode.UnknownKey,
    );
  });

  test('rejections logged and counted', () => {
    const lines = captured.lines.filter(
      (line) => line.msg === 'release rejected',
    );

    assert.deepEqual(
      lines.map((line) => line.code),
      [
        ErrorCode.InvalidSignature,
        ErrorCode.InvalidSignature,
        ErrorCode.NotSigned,
        ErrorCode.ReleaseReplayed,
        ErrorCode.UnknownKey,
      ],
    );
    for (const line of lines) {
      assert.equal(line.level, 40);
      assert.equal(line.vehicleId, VEHICLE_ID);
      assert.equal(typeof line.modelVersion, 'number');
    }
    assert.deepEqual(agent.counters.releasesRejectedByCode, {
      [ErrorCode.InvalidSignature]: 2,
      [ErrorCode.NotSigned]: 1,
      [ErrorCode.ReleaseReplayed]: 1,
      [ErrorCode.UnknownKey]: 1,
    });
    // No chunk of a rejected release was even fetched.
    assert.equal(agent.releaseDownloads.chunksStored, chunksStoredBefore);
  });

  test('genuine release deployed afterwards', async () => {
    const deployed = nextEvent(agent, 'release-deployed');

    await publishRelease(client, releaseV2, noticeV2);

    assert.equal((await deployed).version, 2);
    assert.equal(agent.deployedVersion, 2);
  });
});
