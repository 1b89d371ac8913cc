import assert from 'node:assert/strict';
import { once, type EventEmitter } from 'node:events';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import mqtt, { type MqttClient } from 'mqtt';
import { pino } from 'pino';

import { startBroker, type RunningBroker } from '../broker/index.ts';
import {
  MODEL_NAME,
  tensorNamesOfLayers,
  TENSOR_SPECS,
  type WeightMap,
} from '../models/architecture.ts';
import {
  exportOnnx,
  loadLabelledImages,
  sha256Hex,
  type LabelledImages,
} from '../models/index.ts';
import { initializeWeights } from '../models/weight-init.ts';
import {
  AckStatus,
  ErrorCode,
  FleetTopics,
  VehicleState,
  createLogger,
  decodeModelUpdate,
  decodeTensorValues,
  decodeVehicleStatus,
  encodeRoundTask,
  encodeUpdateAck,
  type Logger,
  type ModelUpdate,
  type RoundTask,
  type VehicleStatus,
} from '../protocol/index.ts';
import { VehicleAgent, type AgentEvents } from '../vehicle-agent/index.ts';
import type { EncodedRelease } from '../aggregator/release-messages.ts';
import {
  buildChunkedRelease,
  encodeTamperedChunk,
  publishChunkedRelease,
  type FetchedRelease,
} from './release-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  path.resolve(REPO_ROOT, '../shared/data/gtsrb32');
const FLEET_ID = 'test-fleet';
const VEHICLE_ID = 'veh-001';
const TRAINABLE = tensorNamesOfLayers(['dense1', 'dense2']);
const SHAPES = new Map(TENSOR_SPECS.map((spec) => [spec.name, spec.shape]));
const EVENT_TIMEOUT_MS = 30_000;

const topics = new FleetTopics(FLEET_ID);

/** Pino logger that keeps every line in memory, for log assertions. */
function captureLogger(): { log: Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      lines.push(JSON.parse(String(chunk)));
      done();
    },
  });
  return { log: pino({ level: 'debug' }, stream), lines };
}

/** A release notice with its file and its encoded messages. */
type TestRelease = FetchedRelease & { encoded: EncodedRelease };

function buildRelease(weights: WeightMap, version: number): TestRelease {
  const onnx = exportOnnx(weights);
  const encoded = buildChunkedRelease(onnx, version);
  return { ...encoded.release, onnx, encoded };
}

function buildTask(
  round: number,
  release: TestRelease,
  selected: string[] = [VEHICLE_ID],
): RoundTask {
  return {
    fleetId: FLEET_ID,
    round,
    modelName: MODEL_NAME,
    modelVersion: release.version,
    selectedVehicles: selected,
    training: {
      localEpochs: 3,
      batchSize: 16,
      learningRate: 0.01,
      proximalMu: 0,
      trainableTensors: TRAINABLE,
      restrictToLocalClasses: true,
    },
    openedAtMs: Date.now(),
    deadlineMs: Date.now() + 120_000,
    minUpdates: 1,
    modelSha256: release.sha256,
  };
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

function waitForEvent<K extends keyof AgentEvents>(
  agent: EventEmitter<AgentEvents>,
  name: K,
): Promise<AgentEvents[K]> {
  return once(agent as EventEmitter, name, {
    signal: AbortSignal.timeout(EVENT_TIMEOUT_MS),
  }) as Promise<AgentEvents[K]>;
}

/** Resolves with the next message on `topic` seen by `client`. */
function nextMessage(client: MqttClient, topic: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off('message', onMessage);
      reject(new Error(`no message on ${topic} in ${EVENT_TIMEOUT_MS} ms`));
    }, EVENT_TIMEOUT_MS);
    const onMessage = (received: string, payload: Buffer): void => {
      if (received !== topic) return;
      clearTimeout(timer);
      client.off('message', onMessage);
      resolve(payload);
    };
    client.on('message', onMessage);
  });
}

function publishRetained(
  client: MqttClient,
  topic: string,
  payload: Uint8Array,
): Promise<unknown> {
  return client.publishAsync(topic, Buffer.from(payload), {
    qos: 1,
    retain: true,
  });
}

function checkUpdate(
  update: ModelUpdate,
  round: number,
  version: number,
): void {
  assert.equal(update.vehicleId, VEHICLE_ID);
  assert.equal(update.modelName, MODEL_NAME);
  assert.equal(update.round, round);
  assert.equal(update.baseModelVersion, version);
  assert.equal(update.numExamples, 200);
  assert.deepEqual(
    update.deltas.map((tensor) => tensor.name),
    TRAINABLE,
  );
  for (const tensor of update.deltas) {
    assert.deepEqual(tensor.shape, SHAPES.get(tensor.name));
    const values = decodeTensorValues(tensor);
    assert.ok(values.every(Number.isFinite), `${tensor.name} is finite`);
    assert.ok(
      values.some((value) => value !== 0),
      `${tensor.name} changed`,
    );
  }
}

describe('vehicle agent over mqtt', () => {
  let broker: RunningBroker;
  let fleet: MqttClient;
  let frames: LabelledImages;
  let stateDir: string;
  let agent: VehicleAgent;
  let logLines: Record<string, unknown>[];
  const statuses: VehicleStatus[] = [];
  const weightsV0 = initializeWeights(11);
  const releaseV0 = buildRelease(weightsV0, 0);
  const releaseV1 = buildRelease(shiftDense(weightsV0, 0.01), 1);

  /** Resolves once a status from index `from` on satisfies `accept`. */
  async function waitForStatus(
    from: number,
    accept: (status: VehicleStatus) => boolean,
  ): Promise<VehicleStatus> {
    const stopAt = Date.now() + EVENT_TIMEOUT_MS;
    while (Date.now() < stopAt) {
      const found = statuses.slice(from).find(accept);
      if (found !== undefined) return found;
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    throw new Error(`no matching status in ${EVENT_TIMEOUT_MS} ms`);
  }

  function startAgent(): VehicleAgent {
    const captured = captureLogger();
    logLines = captured.lines;
    return new VehicleAgent({
      vehicleId: VEHICLE_ID,
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir,
      frames,
      seed: 5,
      log: captured.log,
    });
  }

  before(async () => {
    frames = await loadLabelledImages(DATA_DIR, { split: 'train', limit: 200 });
    stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-agent-'));
    broker = await startBroker({
      port: 0,
      log: createLogger({ level: 'silent' }),
    });
    fleet = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
      clientId: 'test-aggregator',
    });
    await fleet.subscribeAsync(
      [topics.update(VEHICLE_ID), topics.status(VEHICLE_ID)],
      { qos: 1 },
    );
    fleet.on('message', (topic, payload) => {
      if (topic === topics.status(VEHICLE_ID)) {
        statuses.push(decodeVehicleStatus(payload));
      }
    });
    agent = startAgent();
  });

  after(async () => {
    await agent?.stop();
    if (fleet !== undefined) await endClient(fleet, 2000);
    await broker?.close();
    if (stateDir !== undefined)
      rmSync(stateDir, { recursive: true, force: true });
  });

  test('deploys release and sends update', async () => {
    await publishChunkedRelease(fleet, topics, releaseV0.encoded);
    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(1, releaseV0)),
    );
    const updateMessage = nextMessage(fleet, topics.update(VEHICLE_ID));
    const deployed = waitForEvent(agent, 'release-deployed');

    await agent.start();
    const [deployedEvent] = await deployed;
    const payload = await updateMessage;

    assert.equal(deployedEvent.version, 0);
    assert.equal(agent.deployedVersion, 0);
    assert.ok(existsSync(path.join(stateDir, 'models', 'v0.onnx')));
    assert.ok(existsSync(path.join(stateDir, 'current.json')));
    const update = decodeModelUpdate(payload);
    checkUpdate(update, 1, 0);
    assert.equal(update.metrics.backend, agent.backend);
    assert.ok(update.metrics.trainLoss > 0);
    const counters = agent.counters;
    assert.equal(counters.updatesSent, 1);
    assert.equal(counters.bytesSent, payload.length);
    assert.ok(counters.bytesReceived > releaseV0.onnx.length);
    assert.equal(counters.featureCacheMisses, 1);
  });

  test('status is retained online', async () => {
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
      clientId: 'test-status-reader',
    });
    const message = nextMessage(client, topics.status(VEHICLE_ID));
    await client.subscribeAsync(topics.status(VEHICLE_ID));

    const status = decodeVehicleStatus(await message);
    await endClient(client, 2000);

    assert.equal(status.state, VehicleState.Online);
    assert.equal(status.modelVersion, 0);
    assert.equal(status.numExamples, 200);
    assert.equal(status.backend, agent.backend);
  });

  test('acks update counters by reason', async () => {
    const base = {
      round: 1,
      reason: '',
      currentRound: 1,
      currentModelVersion: 0,
    };
    const accepted = waitForEvent(agent, 'ack');
    await fleet.publishAsync(
      topics.ack(VEHICLE_ID),
      Buffer.from(
        encodeUpdateAck({
          ...base,
          updateId: 'u-1',
          status: AckStatus.Accepted,
          reasonCode: '',
        }),
      ),
      { qos: 1 },
    );
    await accepted;
    const rejected = waitForEvent(agent, 'ack');
    await fleet.publishAsync(
      topics.ack(VEHICLE_ID),
      Buffer.from(
        encodeUpdateAck({
          ...base,
          updateId: 'u-2',
          status: AckStatus.Rejected,
          reasonCode: ErrorCode.RoundClosed,
        }),
      ),
      { qos: 1 },
    );
    const [ack] = await rejected;

    assert.equal(ack.reasonCode, ErrorCode.RoundClosed);
    assert.equal(agent.counters.acksAccepted, 1);
    assert.deepEqual(agent.counters.acksRejected, {
      [ErrorCode.RoundClosed]: 1,
    });
  });

  test('tampered release is rejected', async () => {
    const rejected = waitForEvent(agent, 'release-rejected');

    await publishRetained(
      fleet,
      topics.releaseChunk(1, 0),
      encodeTamperedChunk(releaseV1.encoded, 0),
    );
    await publishRetained(fleet, topics.release(), releaseV1.encoded.notice);
    const [event] = await rejected;

    assert.equal(event.code, ErrorCode.DigestMismatch);
    assert.equal(event.version, 1);
    assert.equal(agent.deployedVersion, 0);
    const probabilities = await agent.classify(
      frames.images.subarray(0, 3072),
      1,
    );
    assert.equal(probabilities.length, 43);
    const warning = logLines.find((line) => line.msg === 'release rejected');
    assert.equal(warning?.code, ErrorCode.DigestMismatch);
    assert.equal(warning?.level, 40);
  });

  test('malformed task bytes are skipped', async () => {
    const malformedBefore = agent.counters.malformedMessages;
    const ack = waitForEvent(agent, 'ack');

    await fleet.publishAsync(
      topics.roundTask(),
      Buffer.from([0xff, 0x01, 0x02, 0x80]),
      { qos: 1 },
    );
    await fleet.publishAsync(
      topics.ack(VEHICLE_ID),
      Buffer.from('not protobuf'),
      { qos: 1 },
    );
    await fleet.publishAsync(
      topics.ack(VEHICLE_ID),
      Buffer.from(
        encodeUpdateAck({
          updateId: 'u-3',
          round: 1,
          status: AckStatus.Accepted,
          reasonCode: '',
          reason: '',
          currentRound: 1,
          currentModelVersion: 0,
        }),
      ),
      { qos: 1 },
    );
    const [received] = await ack;

    assert.equal(received.updateId, 'u-3');
    assert.equal(agent.counters.malformedMessages, malformedBefore + 2);
    assert.equal(agent.deployedVersion, 0);
  });

  test('release during training applies after', async () => {
    const firstStatus = statuses.length;
    const order: string[] = [];
    agent.once('training-started', () => {
      order.push('training-started');
      void publishChunkedRelease(fleet, topics, releaseV1.encoded);
    });
    agent.once('training-finished', () => order.push('training-finished'));
    const deployed = waitForEvent(agent, 'release-deployed');
    const updateMessage = nextMessage(fleet, topics.update(VEHICLE_ID));

    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(2, releaseV0)),
    );
    const update = decodeModelUpdate(await updateMessage);
    const [event] = await deployed;
    order.push('release-deployed');

    checkUpdate(update, 2, 0);
    assert.equal(event.version, 1);
    assert.deepEqual(order, [
      'training-started',
      'training-finished',
      'release-deployed',
    ]);
    assert.ok(
      logLines.some(
        (line) => line.msg === 'release held until training finishes',
      ),
    );
    assert.equal(agent.deployedVersion, 1);
    assert.equal(agent.counters.featureCacheHits, 1);
    const training = await waitForStatus(
      firstStatus,
      (status) => status.state === VehicleState.Training,
    );
    const online = await waitForStatus(
      firstStatus,
      (status) => status.modelVersion === 1,
    );
    assert.equal(training.modelVersion, 0);
    assert.equal(online.state, VehicleState.Online);
  });

  test('new version reuses cached features', async () => {
    const updateMessage = nextMessage(fleet, topics.update(VEHICLE_ID));

    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(3, releaseV1)),
    );
    const update = decodeModelUpdate(await updateMessage);

    checkUpdate(update, 3, 1);
    assert.equal(agent.counters.featureCacheHits, 2);
    assert.equal(agent.counters.featureCacheMisses, 1);
    assert.equal(agent.counters.updatesSent, 3);
  });

  test('unselected vehicle skips round', async () => {
    let started = false;
    const onStarted = (): void => {
      started = true;
    };
    agent.on('training-started', onStarted);

    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(4, releaseV1, ['veh-999'])),
    );
    await new Promise((resolve) => setTimeout(resolve, 500));
    agent.off('training-started', onStarted);

    assert.equal(started, false);
    assert.equal(agent.counters.updatesSent, 3);
  });

  test('task waits for its release', async () => {
    const releaseV2 = buildRelease(shiftDense(weightsV0, 0.02), 2);
    const updateMessage = nextMessage(fleet, topics.update(VEHICLE_ID));

    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(5, releaseV2)),
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    const sentBefore = agent.counters.updatesSent;
    await publishChunkedRelease(fleet, topics, releaseV2.encoded);
    const update = decodeModelUpdate(await updateMessage);

    assert.equal(sentBefore, 3);
    checkUpdate(update, 5, 2);
    assert.equal(agent.deployedVersion, 2);
  });

  test('deadline bounds wait for release', async () => {
    const releaseV3 = buildRelease(shiftDense(weightsV0, 0.03), 3);
    const task = { ...buildTask(6, releaseV3), deadlineMs: Date.now() + 300 };

    await publishRetained(fleet, topics.roundTask(), encodeRoundTask(task));
    await new Promise((resolve) => setTimeout(resolve, 600));

    const warning = logLines.find(
      (line) => line.msg === 'round deadline passed before its model arrived',
    );
    assert.equal(warning?.round, 6);
    assert.equal(agent.counters.updatesSent, 4);
    assert.equal(agent.isTraining, false);
  });

  test('oversized update is not published', async () => {
    const captured = captureLogger();
    const smallStateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-agent-'));
    const small = new VehicleAgent({
      vehicleId: 'veh-002',
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: smallStateDir,
      frames,
      maxMessageBytes: 100_000,
      log: captured.log,
    });
    const finished = waitForEvent(small, 'training-finished');
    // Version 2 is the release the main agent runs, so the notice does
    // not move it: a lower version would roll it back.
    const current = buildRelease(shiftDense(weightsV0, 0.02), 2);
    await publishChunkedRelease(fleet, topics, current.encoded);
    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(7, current, ['veh-002'])),
    );

    await small.start();
    const [event] = await finished;
    await small.stop();
    rmSync(smallStateDir, { recursive: true, force: true });

    assert.equal(event.succeeded, false);
    assert.equal(small.counters.updatesSent, 0);
    const failure = captured.lines.find(
      (line) => line.msg === 'round training failed',
    );
    assert.equal(failure?.code, ErrorCode.PayloadTooLarge);
  });

  test('newer round supersedes waiting round', async () => {
    const neverReleased = buildRelease(shiftDense(weightsV0, 0.04), 4);
    const current = buildRelease(shiftDense(weightsV0, 0.02), 2);
    const updateMessage = nextMessage(fleet, topics.update(VEHICLE_ID));

    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(8, neverReleased)),
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    await publishRetained(
      fleet,
      topics.roundTask(),
      encodeRoundTask(buildTask(9, current)),
    );
    const update = decodeModelUpdate(await updateMessage);

    checkUpdate(update, 9, 2);
    const superseded = logLines.find(
      (line) => line.msg === 'round superseded before its model arrived',
    );
    assert.equal(superseded?.round, 8);
  });

  test('restart restores deployed model', async () => {
    const probe = frames.images.subarray(0, 4 * 3072);
    const expected = await agent.classify(probe, 4);
    const firstStatus = statuses.length;
    await agent.stop();
    const status = await waitForStatus(
      firstStatus,
      (received) => received.state === VehicleState.Offline,
    );
    // Clear the retained release so that only the state directory can
    // bring the model back.
    await publishRetained(fleet, topics.release(), new Uint8Array(0));

    agent = startAgent();
    await agent.start();
    const restored = await agent.classify(probe, 4);

    assert.equal(status.modelVersion, 2);
    assert.equal(agent.deployedVersion, 2);
    assert.deepEqual(restored, expected);
    assert.equal(agent.counters.releasesDeployed, 0);
    assert.ok(logLines.some((line) => line.msg === 'deployed model restored'));
  });
});

describe('vehicle agent options', () => {
  const base = {
    vehicleId: VEHICLE_ID,
    fleetId: FLEET_ID,
    brokerUrl: 'mqtt://127.0.0.1:1883',
    stateDir: '/tmp/unused',
    dataDir: '/tmp/unused',
  };

  test('rejects vehicle id with slash', () => {
    assert.throws(
      () => new VehicleAgent({ ...base, vehicleId: 'a/b' }),
      RangeError,
    );
  });

  test('rejects wildcard fleet id', () => {
    assert.throws(
      () => new VehicleAgent({ ...base, fleetId: 'fleet+' }),
      RangeError,
    );
  });

  test('requires one frame source', () => {
    const { dataDir: _unused, ...withoutData } = base;
    assert.throws(() => new VehicleAgent(withoutData), TypeError);
  });

  test('rejects non-mqtt broker url', () => {
    assert.throws(
      () => new VehicleAgent({ ...base, brokerUrl: 'http://127.0.0.1' }),
      RangeError,
    );
  });

  test('rejects zero max message bytes', () => {
    assert.throws(
      () => new VehicleAgent({ ...base, maxMessageBytes: 0 }),
      RangeError,
    );
  });
});
