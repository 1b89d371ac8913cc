import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect, type MqttClient } from 'mqtt';

import type { RunningBroker } from '../broker/index.ts';
import { Aggregator, HOLD_FILE } from '../aggregator/index.ts';
import type {
  RoundOpenedEvent,
  VersionHeldEvent,
} from '../aggregator/events.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import {
  VehicleState,
  decodeModelRelease,
  decodeRoundTask,
  decodeSignedRelease,
  encodeModelUpdate,
  encodeVehicleStatus,
  type RoundTask,
} from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { RolloutController } from '../scripts/rollout/controller.ts';
import { DEFAULT_GATES } from '../scripts/rollout/gates.ts';
import { parseStages } from '../scripts/rollout/state.ts';
import {
  FLEET_ID,
  buildUpdate,
  createWorkspace,
  loadRealImages,
  quietLog,
  startTestBroker,
  testOptions,
  topics,
  type Workspace,
} from './aggregator-fixtures.ts';
import { waitUntil } from './rollout-fixtures.ts';
import {
  createKeyFolder,
  signRelease,
  type KeyFolder,
  type TestKey,
} from './signing-fixtures.ts';

const VEHICLE_ID = 'veh-001';
/** How long a held aggregator is watched for a round it must not open. */
const QUIET_MS = 1500;

/** Connects `clientId`, runs `use` on it, and always disconnects. */
async function withClient<T>(
  broker: RunningBroker,
  clientId: string,
  use: (client: MqttClient) => Promise<T>,
): Promise<T> {
  const client = connect(`mqtt://127.0.0.1:${broker.port}`, {
    protocolVersion: 4,
    clientId,
    reconnectPeriod: 0,
  });
  try {
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => resolve());
      client.once('error', reject);
    });
    return await use(client);
  } finally {
    await endClient(client, 2000);
  }
}

/** Version the retained notice on `releases/current` names. */
function retainedFleetVersion(broker: RunningBroker): Promise<number> {
  return withClient(broker, 'release-reader', async (client) => {
    const payload = new Promise<Buffer>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error('no retained release notice within 5000 ms')),
        5000,
      );
      client.on('message', (topic, bytes) => {
        if (topic !== topics.release()) return;
        clearTimeout(timer);
        resolve(bytes);
      });
    });
    await client.subscribeAsync(topics.release(), { qos: 1 });
    const bytes = await payload;
    const envelope = decodeSignedRelease(bytes);
    return decodeModelRelease(envelope?.signedBytes ?? bytes).version;
  });
}

/**
 * Scripted vehicle: a retained online status and an update for each
 * round task. Unlike TestVehicle it skips the empty task that clears
 * the retained one after a rollback.
 */
class ScriptedVehicle {
  readonly tasks: RoundTask[] = [];

  private constructor(readonly client: MqttClient) {
    client.on('message', (topic, payload) => {
      if (topic === topics.roundTask() && payload.length > 0) {
        this.tasks.push(decodeRoundTask(payload));
      }
    });
  }

  static async connect(broker: RunningBroker): Promise<ScriptedVehicle> {
    const client = connect(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
      clientId: `vehicle-${VEHICLE_ID}`,
      reconnectPeriod: 0,
    });
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => resolve());
      client.once('error', reject);
    });
    const vehicle = new ScriptedVehicle(client);
    await client.subscribeAsync(topics.roundTask(), { qos: 1 });
    const status = encodeVehicleStatus({
      vehicleId: VEHICLE_ID,
      state: VehicleState.Online,
      modelName: MODEL_NAME,
      modelVersion: 0,
      numExamples: 100,
      updatedAtMs: Date.now(),
      connectionId: 0,
      backend: 'test',
    });
    await client.publishAsync(topics.status(VEHICLE_ID), Buffer.from(status), {
      qos: 1,
      retain: true,
    });
    return vehicle;
  }

  /** Waits for the task of `round` and sends an update for it. */
  async train(round: number): Promise<RoundTask> {
    await waitUntil(
      () => this.tasks.some((task) => task.round === round),
      `the task of round ${round}`,
      20_000,
    );
    const task = this.tasks.find((candidate) => candidate.round === round)!;
    const update = encodeModelUpdate(buildUpdate(VEHICLE_ID, task));
    await this.client.publishAsync(
      topics.update(VEHICLE_ID),
      Buffer.from(update),
      { qos: 1 },
    );
    return task;
  }

  close(): Promise<void> {
    return endClient(this.client, 2000);
  }
}

describe('aggregator with staged releases', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let keys: KeyFolder;
  let releaseKey: TestKey;
  let aggregator: Aggregator | undefined;
  let vehicle: ScriptedVehicle;
  let controller: RolloutController;
  const openedRounds: RoundOpenedEvent[] = [];
  const heldEvents: VersionHeldEvent[] = [];

  const stateDir = (): string => join(workspace.dir, 'state');

  async function startAggregator(): Promise<Aggregator> {
    const images = await loadRealImages();
    const started = new Aggregator(
      testOptions(broker, workspace, images, {
        maxRounds: 0,
        stagedReleases: true,
        releaseSigningKeyPath: releaseKey.privateKeyPath,
      }),
    );
    started.on('round-opened', (event) => openedRounds.push(event));
    started.on('version-held', (event) => heldEvents.push(event));
    aggregator = started;
    await started.start();
    return started;
  }

  /** Sends the update of `round` and waits until its version is heldEvents. */
  async function holdRound(round: number): Promise<VersionHeldEvent> {
    await vehicle.train(round);
    await waitUntil(
      () => heldEvents.some((event) => event.round === round),
      `the version of round ${round} to be held`,
      30_000,
    );
    return heldEvents.find((event) => event.round === round)!;
  }

  async function assertNoRoundOpens(after: number): Promise<void> {
    await new Promise((resolve) => setTimeout(resolve, QUIET_MS));
    assert.equal(
      openedRounds.at(-1)?.round,
      after,
      'a round opened while held',
    );
  }

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
    keys = createKeyFolder();
    releaseKey = keys.createKey('release');
    vehicle = await ScriptedVehicle.connect(broker);
    controller = new RolloutController({
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      modelStateDir: stateDir(),
      rolloutDir: join(workspace.dir, 'rollout'),
      signingKey: releaseKey.signer,
      maxMessageBytes: 256 * 1024,
      log: quietLog,
    });
  });

  after(async () => {
    await aggregator?.stop();
    await controller.close();
    await vehicle.close();
    await broker.close();
    workspace.remove();
    keys.remove();
  });

  test('new version waits for promotion', async () => {
    const running = await startAggregator();
    await controller.connect();

    const first = await holdRound(1);

    assert.equal(first.modelVersion, 1);
    assert.equal(running.currentModelVersion, 1);
    assert.equal(await retainedFleetVersion(broker), 0);
    assert.ok(existsSync(join(stateDir(), HOLD_FILE)));
    await assertNoRoundOpens(1);

    await controller.start({
      version: 1,
      stages: parseStages('100', false),
      cohortTags: {},
      vehicleIds: [],
      gates: DEFAULT_GATES,
    });
    await controller.promote('test');
    await waitUntil(() => openedRounds.length >= 2, 'round 2 to open', 20_000);

    assert.deepEqual(
      {
        round: openedRounds[1].round,
        modelVersion: openedRounds[1].modelVersion,
      },
      { round: 2, modelVersion: 1 },
    );
    assert.equal(await retainedFleetVersion(broker), 1);
    assert.ok(!existsSync(join(stateDir(), HOLD_FILE)));
  });

  test('notice from another key is ignored', async () => {
    const second = await holdRound(2);
    assert.equal(second.modelVersion, 2);
    const stranger = keys.createKey('stranger');
    const forged = signRelease(
      stranger,
      {
        modelName: MODEL_NAME,
        version: 2,
        parentVersion: 1,
        round: 2,
        sha256: '0'.repeat(64),
        sizeBytes: 1,
        createdAtMs: Date.now(),
        testAccuracy: 0,
        numVehicles: 1,
        numExamples: 10,
        chunkSizeBytes: 1,
        chunkCount: 1,
        chunkSha256: ['0'.repeat(64)],
        releaseSequence: 0,
      },
      Date.now(),
    );

    await withClient(broker, 'forger', (client) =>
      client.publishAsync(topics.release(), Buffer.from(forged), {
        qos: 1,
        retain: false,
      }),
    );

    await assertNoRoundOpens(2);
  });

  test('pin of older version is adopted', async () => {
    await controller.pin(1, 'test');
    await waitUntil(() => openedRounds.length >= 3, 'round 3 to open', 20_000);

    assert.deepEqual(
      {
        round: openedRounds[2].round,
        modelVersion: openedRounds[2].modelVersion,
      },
      { round: 3, modelVersion: 1 },
    );
    assert.equal(aggregator!.currentModelVersion, 1);
  });

  test('restart keeps waiting on held version', async () => {
    const third = await holdRound(3);
    assert.equal(third.modelVersion, 3);
    await aggregator!.stop();

    const restarted = await startAggregator();

    assert.equal(restarted.currentModelVersion, 3);
    assert.equal(await retainedFleetVersion(broker), 1);
    await assertNoRoundOpens(3);
  });

  test('withdrawn candidate returns to fleet version', async () => {
    await controller.start({
      version: 3,
      stages: parseStages('10,100', false),
      cohortTags: {},
      vehicleIds: [],
      gates: DEFAULT_GATES,
    });
    await assertNoRoundOpens(3);

    await controller.rollback('test');
    await waitUntil(() => openedRounds.length >= 4, 'round 4 to open', 20_000);

    assert.deepEqual(
      {
        round: openedRounds[3].round,
        modelVersion: openedRounds[3].modelVersion,
      },
      { round: 4, modelVersion: 1 },
    );
    assert.equal(await retainedFleetVersion(broker), 1);
  });
});
