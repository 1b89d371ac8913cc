import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once, type EventEmitter } from 'node:events';
import { readFileSync, renameSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  Aggregator,
  type AggregatorEvents,
  type ModelManifest,
  type RoundClosedEvent,
  type RoundFailedEvent,
} from '../aggregator/index.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  MODEL_NAME,
  loadLabelledImages,
  resolveDataDir,
  sha256Hex,
} from '../models/index.ts';
import {
  ErrorCode,
  FleetError,
  VehicleState,
  createLogger,
  encodeVehicleStatus,
} from '../protocol/index.ts';
import { VehicleAgent, type AgentEvents } from '../vehicle-agent/index.ts';
import {
  FLEET_ID,
  createWorkspace,
  fetchRetainedRelease,
  loadRealImages,
  startTestBroker,
  testOptions,
  topics,
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';
import {
  connectClient,
  listRetainedChunks,
  publishRetained,
} from './release-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BASE_WEIGHTS = path.join(
  REPOSITORY_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
/** Splits the base model's ONNX file (about 640 KB) into 3 chunks. */
const MAX_MESSAGE_BYTES = 256 * 1024;
const EVENT_TIMEOUT_MS = 60_000;
const IDLE_VEHICLE = 'veh-idle';
const silent = createLogger({ level: 'silent' });

/** Resolves with the first `name` event whose payload passes `accept`. */
function waitFor<T>(
  emitter: EventEmitter,
  name: string,
  accept: (payload: T) => boolean = () => true,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      emitter.off(name, listener);
      reject(new Error(`no matching ${name} event in ${EVENT_TIMEOUT_MS} ms`));
    }, EVENT_TIMEOUT_MS);
    const listener = (payload: T): void => {
      if (!accept(payload)) return;
      clearTimeout(timer);
      emitter.off(name, listener);
      resolve(payload);
    };
    emitter.on(name, listener);
  });
}

function onAggregator<K extends keyof AggregatorEvents>(
  aggregator: Aggregator,
  name: K,
  accept?: (payload: AggregatorEvents[K][0]) => boolean,
): Promise<AggregatorEvents[K][0]> {
  return waitFor(aggregator as EventEmitter, name, accept);
}

function onAgent<K extends keyof AgentEvents>(
  agent: VehicleAgent,
  name: K,
  accept?: (payload: AgentEvents[K][0]) => boolean,
): Promise<AgentEvents[K][0]> {
  return waitFor(agent as EventEmitter, name, accept);
}

/** Publishes the retained status of a vehicle that never trains. */
async function publishIdleStatus(
  broker: RunningBroker,
  state: number,
): Promise<void> {
  const client = await connectClient(broker.port);
  const status = encodeVehicleStatus({
    vehicleId: IDLE_VEHICLE,
    state,
    modelName: MODEL_NAME,
    modelVersion: 0,
    numExamples: 100,
    updatedAtMs: Date.now(),
    connectionId: 0,
    backend: 'none',
  });
  await publishRetained(client, topics.status(IDLE_VEHICLE), status);
  await endClient(client, 2000);
}

describe('release rollback', () => {
  let broker: RunningBroker;
  let workspace: Workspace;
  let images: RealImages;
  let agent: VehicleAgent;
  let aggregator: Aggregator | undefined;

  function stateDir(): string {
    return path.join(workspace.dir, 'state');
  }

  function manifestOf(version: number): ModelManifest {
    const file = path.join(
      stateDir(),
      'models',
      MODEL_NAME,
      `v${version}.json`,
    );
    return JSON.parse(readFileSync(file, 'utf8')) as ModelManifest;
  }

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
    images = await loadRealImages();
    const frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: 100,
    });
    agent = new VehicleAgent({
      vehicleId: 'veh-real',
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workspace.dir, 'vehicle'),
      frames,
      maxMessageBytes: MAX_MESSAGE_BYTES,
      log: silent,
    });
    await agent.start();
  });

  after(async () => {
    await aggregator?.stop();
    await agent.stop();
    await broker.close();
    workspace.remove();
  });

  test('rollback to kept previous model', { timeout: 120_000 }, async () => {
    aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        baseWeightsPath: BASE_WEIGHTS,
        trainableLayers: ['dense2'],
        maxMessageBytes: MAX_MESSAGE_BYTES,
        roundTimeoutMs: 60_000,
        maxRounds: 4,
      }),
    );
    // The idle vehicle joins during round 2, so round 3 waits for it and
    // is still open at the rollback.
    void onAggregator(aggregator, 'round-opened', (e) => e.round === 2).then(
      () => publishIdleStatus(broker, VehicleState.Online),
    );
    const deployedV2 = onAgent(
      agent,
      'release-deployed',
      (e) => e.version === 2,
    );
    const round3Opened = onAggregator(
      aggregator,
      'round-opened',
      (e) => e.round === 3,
    );
    await aggregator.start();
    await deployedV2;
    await round3Opened;
    await onAgent(agent, 'ack', (ack) => ack.round === 3);
    await publishIdleStatus(broker, VehicleState.Offline);
    const storedBefore = agent.releaseDownloads.chunksStored;
    const failed = onAggregator(aggregator, 'round-failed');
    const switched = onAgent(agent, 'release-deployed', (e) => e.version === 1);
    const round4Closed = onAggregator(
      aggregator,
      'round-closed',
      (e) => e.round === 4,
    );

    await aggregator.rollbackTo(1);
    const state = JSON.parse(
      readFileSync(path.join(stateDir(), 'state.json'), 'utf8'),
    ) as { round: number; modelVersion: number };
    const rolledBack = await fetchRetainedRelease(broker);
    const failedEvent: RoundFailedEvent = await failed;
    const switchedEvent = await switched;
    const storedAfterSwitch = agent.releaseDownloads.chunksStored;
    const closed: RoundClosedEvent = await round4Closed;
    await aggregator.whenFinished();
    const next = await fetchRetainedRelease(broker);
    const retained = await listRetainedChunks(broker.port, topics);

    assert.equal(failedEvent.round, 3);
    assert.equal(failedEvent.reasonCode, ErrorCode.RolledBack);
    assert.equal(failedEvent.modelVersion, 1);
    // Round 4 may already have opened and recorded its number.
    assert.equal(state.modelVersion, 1);
    assert.ok(state.round >= 3, `state round ${state.round}`);
    assert.equal(rolledBack.version, 1);
    assert.equal(rolledBack.sha256, manifestOf(1).sha256);
    assert.equal(sha256Hex(rolledBack.onnx), manifestOf(1).sha256);
    assert.equal(switchedEvent.previousVersion, 2);
    assert.equal(storedAfterSwitch, storedBefore);
    assert.equal(closed.modelVersion, 3);
    assert.equal(next.version, 3);
    assert.equal(next.parentVersion, 1);
    assert.equal(manifestOf(3).parentVersion, 1);
    assert.equal(aggregator.roundsCompleted, 4);
    assert.equal(aggregator.currentModelVersion, 3);
    const chunkCount = next.chunkCount;
    assert.ok(chunkCount >= 3, `${chunkCount} chunks`);
    // Version 2 was withdrawn and version 0 is older than the previous one.
    assert.deepEqual(
      retained,
      [1, 3]
        .flatMap((version) =>
          Array.from({ length: chunkCount }, (_, i) => `v${version}/${i}`),
        )
        .sort(),
    );
  });

  test('rollback rejects invalid targets', async () => {
    const running = aggregator!;
    const assertCode = (code: string) => (err: unknown) =>
      err instanceof FleetError && err.code === code;

    await assert.rejects(
      running.rollbackTo(3),
      assertCode(ErrorCode.InvalidConfig),
    );
    await assert.rejects(
      running.rollbackTo(9),
      assertCode(ErrorCode.InvalidConfig),
    );
    await assert.rejects(running.rollbackTo(-1), RangeError);
    const manifest = path.join(stateDir(), 'models', MODEL_NAME, 'v2.json');
    renameSync(manifest, `${manifest}.hidden`);
    try {
      await assert.rejects(running.rollbackTo(2), (err) => {
        assert.ok(assertCode(ErrorCode.InvalidModel)(err));
        assert.match((err as Error).message, /version 2 from 3/);
        return true;
      });
    } finally {
      renameSync(`${manifest}.hidden`, manifest);
    }
    assert.equal(running.currentModelVersion, 3);
    assert.equal((await fetchRetainedRelease(broker)).version, 3);
  });

  test('command line rollback at start', { timeout: 60_000 }, async () => {
    await aggregator!.stop();
    aggregator = undefined;
    const downloaded = onAgent(
      agent,
      'release-deployed',
      (e) => e.version === 2,
    );
    const storedBefore = agent.releaseDownloads.chunksStored;
    const child = spawn(
      process.execPath,
      [
        ...['--import', 'tsx', 'aggregator/main.ts'],
        ...['--fleet-id', FLEET_ID],
        ...['--broker-url', `mqtt://127.0.0.1:${broker.port}`],
        ...['--state-dir', stateDir()],
        ...['--base-weights', BASE_WEIGHTS],
        ...['--max-message-bytes', String(MAX_MESSAGE_BYTES)],
        // Two vehicles never come online, so no round opens.
        ...['--min-updates', '2'],
        ...['--rollback-to', '2'],
      ],
      { cwd: REPOSITORY_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let output = '';
    child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()));
    child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()));
    const exited = once(child, 'exit');

    try {
      const event = await downloaded;
      const release = await fetchRetainedRelease(broker);

      assert.equal(event.previousVersion, 3);
      assert.equal(release.version, 2);
      assert.equal(release.sha256, manifestOf(2).sha256);
      // Version 1 is the kept previous model, not 2, so 2 was downloaded.
      assert.equal(
        agent.releaseDownloads.chunksStored - storedBefore,
        release.chunkCount,
      );
      assert.equal(agent.deployedVersion, 2);
    } finally {
      child.kill('SIGTERM');
      await exited;
    }
    assert.equal(child.exitCode, 0, output);
    assert.match(output, /model rolled back/);
  });
});
