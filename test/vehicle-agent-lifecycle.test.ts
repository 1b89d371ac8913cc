import assert from 'node:assert/strict';
import { EventEmitter, once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, afterEach, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import mqtt, { type MqttClient } from 'mqtt';
import { pino } from 'pino';

import { startBroker, type RunningBroker } from '../broker/index.ts';
import { MODEL_NAME, tensorNamesOfLayers } from '../models/architecture.ts';
import {
  exportOnnx,
  loadLabelledImages,
  sha256Hex,
  type LabelledImages,
} from '../models/index.ts';
import { initializeWeights } from '../models/weight-init.ts';
import {
  FleetTopics,
  VehicleState,
  createLogger,
  decodeVehicleStatus,
  encodeRoundTask,
  type Logger,
  type ModelRelease,
  type RoundTask,
} from '../protocol/index.ts';
import { VehicleAgent, type AgentEvents } from '../vehicle-agent/index.ts';
import type { EncodedRelease } from '../aggregator/release-messages.ts';
import {
  buildChunkedRelease,
  publishChunkedRelease,
} from './release-fixtures.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  path.resolve(REPO_ROOT, '../shared/data/gtsrb32');
const FLEET_ID = 'lifecycle-fleet';
const VEHICLE_ID = 'veh-101';
const EVENT_TIMEOUT_MS = 30_000;
/** Max time a stop may take, with the broker down or training running. */
const STOP_BOUND_MS = 5000;

const topics = new FleetTopics(FLEET_ID);
const silent = createLogger({ level: 'silent' });

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

function waitForEvent<K extends keyof AgentEvents>(
  agent: EventEmitter<AgentEvents>,
  name: K,
): Promise<AgentEvents[K]> {
  return once(agent as EventEmitter, name, {
    signal: AbortSignal.timeout(EVENT_TIMEOUT_MS),
  }) as Promise<AgentEvents[K]>;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `condition` every 20 ms until it is true or `timeoutMs` passes. */
async function waitUntil(
  condition: () => boolean,
  timeoutMs: number,
): Promise<void> {
  const stopAt = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > stopAt)
      throw new Error(`condition not met in ${timeoutMs} ms`);
    await delay(20);
  }
}

/** Finds a free port by starting a broker on port 0 and closing it. */
async function freePort(): Promise<number> {
  const probe = await startBroker({ port: 0, log: silent });
  const { port } = probe;
  await probe.close();
  return port;
}

function connectFleet(port: number, clientId: string): Promise<MqttClient> {
  return mqtt.connectAsync(`mqtt://127.0.0.1:${port}`, {
    protocolVersion: 4,
    clientId,
  });
}

function buildRelease(): EncodedRelease {
  return buildChunkedRelease(exportOnnx(initializeWeights(21)), 0);
}

/** Builds a task with enough epochs that a stop lands during training. */
function buildLongTask(release: ModelRelease): RoundTask {
  return {
    fleetId: FLEET_ID,
    round: 1,
    modelName: MODEL_NAME,
    modelVersion: release.version,
    selectedVehicles: [VEHICLE_ID],
    training: {
      localEpochs: 500,
      batchSize: 8,
      learningRate: 0.01,
      proximalMu: 0,
      trainableTensors: tensorNamesOfLayers(['dense1', 'dense2']),
      restrictToLocalClasses: false,
    },
    openedAtMs: Date.now(),
    deadlineMs: Date.now() + 300_000,
    minUpdates: 1,
    modelSha256: release.sha256,
  };
}

describe('vehicle agent lifecycle', () => {
  let frames: LabelledImages;
  let stateDir: string;
  let broker: RunningBroker | undefined;
  let agent: VehicleAgent | undefined;
  let fleet: MqttClient | undefined;

  function createAgent(port: number, log: Logger): VehicleAgent {
    return new VehicleAgent({
      vehicleId: VEHICLE_ID,
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${port}`,
      stateDir,
      frames,
      seed: 3,
      log,
    });
  }

  before(async () => {
    frames = await loadLabelledImages(DATA_DIR, { split: 'train', limit: 200 });
  });

  afterEach(async () => {
    await agent?.stop();
    await fleet?.endAsync(true);
    await broker?.close();
    agent = undefined;
    fleet = undefined;
    broker = undefined;
    if (stateDir !== undefined)
      rmSync(stateDir, { recursive: true, force: true });
  });

  after(() => {
    if (stateDir !== undefined)
      rmSync(stateDir, { recursive: true, force: true });
  });

  test('starts before broker is up', async () => {
    stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-lifecycle-'));
    const port = await freePort();
    const captured = captureLogger();
    agent = createAgent(port, captured.log);

    await agent.start();
    assert.equal(agent.connected, false);
    // mqtt.js makes its first retry one reconnect period (2 s) after the
    // refused attempt.
    await waitUntil(
      () =>
        captured.lines.some(
          (line) => line.msg === 'broker unreachable, retrying',
        ),
      10_000,
    );
    const connected = waitForEvent(agent, 'connected');
    broker = await startBroker({ port, log: silent });
    await connected;

    const retry = captured.lines.find(
      (line) => line.msg === 'broker unreachable, retrying',
    );
    assert.equal(retry?.level, 40);
    assert.equal(retry?.brokerUrl, `mqtt://127.0.0.1:${port}`);
    assert.equal(
      (retry?.err as { code?: string } | undefined)?.code,
      'ECONNREFUSED',
    );
    assert.equal(agent.connected, true);
    fleet = await connectFleet(port, 'lifecycle-status-reader');
    const statusMessage = once(fleet as unknown as EventEmitter, 'message', {
      signal: AbortSignal.timeout(EVENT_TIMEOUT_MS),
    });
    await fleet.subscribeAsync(topics.status(VEHICLE_ID), { qos: 1 });
    const [, payload] = (await statusMessage) as [string, Buffer];
    assert.equal(decodeVehicleStatus(payload).state, VehicleState.Online);
  });

  test('stop with broker down is bounded', async () => {
    stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-lifecycle-'));
    broker = await startBroker({ port: 0, log: silent });
    const captured = captureLogger();
    agent = createAgent(broker.port, captured.log);
    const connected = waitForEvent(agent, 'connected');
    await agent.start();
    await connected;

    await broker.close();
    broker = undefined;
    await waitUntil(() => agent?.connected === false, 10_000);
    const started = Date.now();
    await agent.stop();
    const durationMs = Date.now() - started;

    assert.ok(durationMs < STOP_BOUND_MS, `stop took ${durationMs} ms`);
    assert.ok(
      captured.lines.some(
        (line) =>
          line.msg ===
          'broker not connected at stop, offline status left to last will',
      ),
    );
    assert.ok(captured.lines.some((line) => line.msg === 'agent stopped'));
  });

  test('stop during training sends nothing', async () => {
    stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-lifecycle-'));
    broker = await startBroker({ port: 0, log: silent });
    fleet = await connectFleet(broker.port, 'lifecycle-aggregator');
    const received: string[] = [];
    fleet.on('message', (topic) => received.push(topic));
    await fleet.subscribeAsync(
      [topics.update(VEHICLE_ID), topics.status(VEHICLE_ID)],
      { qos: 1 },
    );
    const release = buildRelease();
    await publishChunkedRelease(fleet, topics, release);
    await fleet.publishAsync(
      topics.roundTask(),
      Buffer.from(encodeRoundTask(buildLongTask(release.release))),
      { qos: 1, retain: true },
    );
    const captured = captureLogger();
    agent = createAgent(broker.port, captured.log);
    const trainingStarted = waitForEvent(agent, 'training-started');
    const trainingFinished = waitForEvent(agent, 'training-finished');

    await agent.start();
    await trainingStarted;
    await waitUntil(
      () =>
        captured.lines.some((line) => line.msg === 'local training started'),
      EVENT_TIMEOUT_MS,
    );
    await delay(300);
    const started = Date.now();
    await agent.stop();
    const durationMs = Date.now() - started;
    const [finished] = await trainingFinished;
    const countAtStop = received.length;
    await delay(1000);

    assert.ok(durationMs < STOP_BOUND_MS, `stop took ${durationMs} ms`);
    assert.equal(finished.succeeded, false);
    assert.equal(agent.counters.updatesSent, 0);
    assert.ok(!received.includes(topics.update(VEHICLE_ID)));
    assert.equal(received.length, countAtStop);
    assert.ok(
      captured.lines.some(
        (line) => line.msg === 'round training aborted by stop',
      ),
    );
    const stoppedAt = captured.lines.findIndex(
      (line) => line.msg === 'agent stopped',
    );
    assert.ok(stoppedAt >= 0);
    assert.ok(
      !captured.lines.some((line) => line.msg === 'update sent'),
      'no update sent after stop began',
    );
  });
});
