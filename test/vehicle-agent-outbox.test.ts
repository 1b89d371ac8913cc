import assert from 'node:assert/strict';
import { EventEmitter, once } from 'node:events';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  rmSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import {
  after,
  afterEach,
  before,
  beforeEach,
  describe,
  test,
} from 'node:test';
import { fileURLToPath } from 'node:url';

import mqtt, { type MqttClient } from 'mqtt';
import { pino } from 'pino';

import {
  Aggregator,
  type RoundClosedEvent,
  type UpdateDecidedEvent,
} from '../aggregator/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import { loadLabelledImages, type LabelledImages } from '../models/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetTopics,
  VehicleState,
  createLogger,
  encodeModelUpdate,
  encodeVehicleStatus,
  type Logger,
  type UpdateAck,
} from '../protocol/index.ts';
import {
  Outbox,
  VehicleAgent,
  type AgentEvents,
} from '../vehicle-agent/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  path.resolve(REPO_ROOT, '../shared/data/gtsrb32');
const BASE_WEIGHTS = path.join(
  REPO_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const FLEET_ID = 'outbox-fleet';
const VEHICLE_ID = 'veh-outbox';
/** Second selected vehicle that never sends, so the round stays open. */
const IDLE_VEHICLE_ID = 'veh-idle';
const EVENT_TIMEOUT_MS = 40_000;
/** Long enough for training, the crash, a restart and the resend. */
const ROUND_TIMEOUT_MS = 20_000;

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
    if (Date.now() > stopAt) {
      throw new Error(`condition not met in ${timeoutMs} ms`);
    }
    await delay(20);
  }
}

function encodeTestUpdate(updateId: string, round: number): Uint8Array {
  return encodeModelUpdate({
    updateId,
    vehicleId: VEHICLE_ID,
    modelName: MODEL_NAME,
    baseModelVersion: 0,
    round,
    numExamples: 10,
    deltas: [],
    metrics: {
      trainLoss: 1,
      trainAccuracy: 0.5,
      trainDurationMs: 5,
      backend: 'cpu',
    },
    createdAtMs: Date.now(),
  });
}

function pendingFiles(stateDir: string): string[] {
  const dir = path.join(stateDir, 'outbox');
  if (!existsSync(dir)) return [];
  return readdirSync(dir).filter((name) => name.endsWith('.pb'));
}

describe('outbox on disk', () => {
  let stateDir: string;

  beforeEach(() => {
    stateDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-outbox-'));
  });

  afterEach(() => rmSync(stateDir, { recursive: true, force: true }));

  test('add writes entry atomically', async () => {
    const outbox = new Outbox(stateDir, silent);
    const payload = encodeTestUpdate('upd-a', 3);
    await outbox.add('upd-a', 3, payload);

    const names = readdirSync(outbox.dir);
    assert.deepEqual(names, ['upd-a.pb']);
    const entries = await outbox.list();
    assert.equal(entries.length, 1);
    assert.equal(entries[0].updateId, 'upd-a');
    assert.equal(entries[0].round, 3);
    assert.deepEqual(Buffer.from(entries[0].payload), Buffer.from(payload));
    await outbox.remove('upd-a');
  });

  test('list sorts by file mtime', async () => {
    const outbox = new Outbox(stateDir, silent);
    await outbox.add('upd-new', 2, encodeTestUpdate('upd-new', 2));
    await outbox.add('upd-old', 1, encodeTestUpdate('upd-old', 1));
    const past = new Date(Date.now() - 60_000);
    utimesSync(path.join(outbox.dir, 'upd-old.pb'), past, past);

    const entries = await outbox.list();
    assert.deepEqual(
      entries.map((entry) => entry.updateId),
      ['upd-old', 'upd-new'],
    );
    assert.deepEqual(
      entries.map((entry) => entry.round),
      [1, 2],
    );
    await outbox.remove('upd-old');
    await outbox.remove('upd-new');
  });

  test('remove deletes entry once', async () => {
    const outbox = new Outbox(stateDir, silent);
    await outbox.add('upd-b', 1, encodeTestUpdate('upd-b', 1));

    assert.equal(await outbox.remove('upd-b'), true);
    assert.equal(await outbox.remove('upd-b'), false);
    assert.deepEqual(await outbox.list(), []);
  });

  test('corrupt entry moved aside', async () => {
    const { log, lines } = captureLogger();
    const outbox = new Outbox(stateDir, log);
    mkdirSync(outbox.dir, { recursive: true });
    writeFileSync(path.join(outbox.dir, 'upd-bad.pb'), 'not protobuf \xff');
    // A valid update stored under another update id's name.
    writeFileSync(
      path.join(outbox.dir, 'upd-renamed.pb'),
      encodeTestUpdate('upd-other', 1),
    );
    await outbox.add('upd-good', 4, encodeTestUpdate('upd-good', 4));

    const entries = await outbox.list();
    assert.deepEqual(
      entries.map((entry) => entry.updateId),
      ['upd-good'],
    );
    const moved = readdirSync(outbox.corruptDir).sort();
    assert.equal(moved.length, 2);
    assert.ok(moved[0].startsWith('upd-bad.pb.'));
    assert.ok(moved[1].startsWith('upd-renamed.pb.'));
    const warnings = lines.filter(
      (line) => line.msg === 'corrupt outbox entry moved aside',
    );
    assert.equal(warnings.length, 2);
    assert.ok(warnings.every((line) => line.level === 40));
    await outbox.remove('upd-good');
  });

  test('unsafe update id rejected', async () => {
    const outbox = new Outbox(stateDir, silent);
    const payload = encodeTestUpdate('x', 1);
    await assert.rejects(outbox.add('../escape', 1, payload), RangeError);
    await assert.rejects(outbox.add('', 1, payload), RangeError);
    assert.equal(await outbox.remove('a/b'), false);
  });
});

describe('outbox with aggregator', () => {
  let broker: RunningBroker;
  let workDir: string;
  let frames: LabelledImages;
  let aggregator: Aggregator | undefined;
  let idleVehicle: MqttClient | undefined;
  const agents: VehicleAgent[] = [];

  before(async () => {
    frames = await loadLabelledImages(DATA_DIR, { split: 'train', limit: 100 });
    workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-outbox-agent-'));
    broker = await startBroker({ port: 0, log: silent });
  });

  after(async () => {
    for (const agent of agents) await agent.stop();
    await aggregator?.stop();
    if (idleVehicle !== undefined) await endClient(idleVehicle, 2000);
    await broker.close();
    rmSync(workDir, { recursive: true, force: true });
  });

  function createAgent(stateDir: string): VehicleAgent {
    const agent = new VehicleAgent({
      vehicleId: VEHICLE_ID,
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir,
      dataDir: DATA_DIR,
      dataLimit: 100,
      log: silent,
    });
    agents.push(agent);
    return agent;
  }

  /** Publishes a retained ONLINE status for a vehicle that never trains. */
  async function connectIdleVehicle(): Promise<MqttClient> {
    const client = await mqtt.connectAsync(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
      clientId: `vehicle-${IDLE_VEHICLE_ID}`,
    });
    const status = encodeVehicleStatus({
      vehicleId: IDLE_VEHICLE_ID,
      state: VehicleState.Online,
      modelName: MODEL_NAME,
      modelVersion: 0,
      numExamples: 100,
      updatedAtMs: Date.now(),
      connectionId: 0,
      backend: 'cpu',
    });
    await client.publishAsync(
      topics.status(IDLE_VEHICLE_ID),
      Buffer.from(status),
      {
        qos: 1,
        retain: true,
      },
    );
    return client;
  }

  test('agent killed before ack, counted once', async () => {
    const vehicleStateDir = path.join(workDir, 'vehicle');
    const decided: UpdateDecidedEvent[] = [];

    // The idle vehicle makes the round select two vehicles, so the round
    // stays open until its deadline. The resend then reaches an open round
    // and the aggregator rejects it with DUPLICATE_UPDATE, not ROUND_CLOSED.
    idleVehicle = await connectIdleVehicle();
    aggregator = new Aggregator({
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, 'aggregator'),
      baseWeightsPath: BASE_WEIGHTS,
      minVehiclesOnline: 2,
      minUpdates: 1,
      maxRounds: 1,
      roundTimeoutMs: ROUND_TIMEOUT_MS,
      onlineWaitTimeoutMs: 30_000,
      probeImages: frames.images.subarray(0, 8 * 32 * 32 * 3),
      probeCount: 8,
      log: silent,
    });
    aggregator.on('update-decided', (event) => decided.push(event));
    const closed = once(aggregator, 'round-closed', {
      signal: AbortSignal.timeout(ROUND_TIMEOUT_MS + EVENT_TIMEOUT_MS),
    });
    await aggregator.start();

    const first = createAgent(vehicleStateDir);
    // Crash simulation: the agent's private ack handler is replaced by one
    // that drops every ack, as if the process died after mqtt.js received
    // the ack but before the agent handled it. The aggregator really
    // accepts the update and sends its ack, but the outbox entry stays.
    // The client is then ended by force, without DISCONNECT, so the broker
    // publishes the last will as after a crash.
    // NOTE: mqtt.js has already sent PUBACK for the dropped ack, so this
    // test does not cover an ack the broker queues in the persistent
    // session while the vehicle is offline.
    const droppedAcks: string[] = [];
    Object.assign(first, {
      handleAck: () => droppedAcks.push('ack'),
    });
    const sentPromise = waitForEvent(first, 'update-sent');
    await first.start();
    const [sent] = await sentPromise;
    await waitUntil(
      () => decided.some((event) => event.updateId === sent.updateId),
      EVENT_TIMEOUT_MS,
    );
    await waitUntil(() => droppedAcks.length === 1, EVENT_TIMEOUT_MS);
    const client = (first as unknown as { client: MqttClient }).client;
    await client.endAsync(true);
    await first.stop();

    assert.deepEqual(pendingFiles(vehicleStateDir), [`${sent.updateId}.pb`]);
    assert.equal(first.counters.outboxPending, 1);

    const second = createAgent(vehicleStateDir);
    let trainingRuns = 0;
    second.on('training-started', () => (trainingRuns += 1));
    const acks: UpdateAck[] = [];
    second.on('ack', (ack) => acks.push(ack));
    const resent = waitForEvent(second, 'update-resent');
    await second.start();
    assert.equal(second.counters.outboxPending, 1);
    const [resentEvent] = await resent;
    assert.equal(resentEvent.updateId, sent.updateId);
    assert.equal(resentEvent.round, sent.round);
    await waitUntil(
      () => acks.some((ack) => ack.updateId === sent.updateId),
      EVENT_TIMEOUT_MS,
    );

    const [roundClosed] = (await closed) as [RoundClosedEvent];
    assert.equal(roundClosed.round, sent.round);
    assert.equal(roundClosed.accepted, 1);

    const ofFirstUpdate = decided.filter(
      (event) => event.updateId === sent.updateId,
    );
    assert.equal(ofFirstUpdate.length, 2);
    assert.equal(ofFirstUpdate[0].accepted, true);
    assert.equal(ofFirstUpdate[1].accepted, false);
    assert.equal(ofFirstUpdate[1].reasonCode, ErrorCode.DuplicateUpdate);
    const resendAck = acks.find((ack) => ack.updateId === sent.updateId)!;
    assert.equal(resendAck.status, AckStatus.Rejected);
    assert.equal(resendAck.reasonCode, ErrorCode.DuplicateUpdate);
    const acceptedCount = decided.filter((event) => event.accepted).length;
    assert.equal(acceptedCount, 1);

    // The second agent finds the round in finished-rounds.json, so the
    // retained task of the open round does not make it train again.
    await waitUntil(
      () => second.counters.outboxPending === 0,
      EVENT_TIMEOUT_MS,
    );
    assert.deepEqual(pendingFiles(vehicleStateDir), []);
    assert.equal(trainingRuns, 0);
    assert.equal(second.counters.updatesSent, 0);
    assert.equal(decided.length, 2);
  });
});
