import assert from 'node:assert/strict';
import type { EventEmitter } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { Aggregator, type AggregatorOptions } from '../aggregator/index.ts';
import { encodeRelease } from '../aggregator/release-messages.ts';
import { ReleaseSigner } from '../aggregator/release-signer.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import {
  exportOnnx,
  loadLabelledImages,
  readWeightsFile,
  resolveDataDir,
  type LabelledImages,
} from '../models/index.ts';
import {
  ErrorCode,
  FleetTopics,
  createLogger,
  loadSigningKey,
  readPublicKeys,
  readSigningConfig,
  type SigningFiles,
  type SigningKey,
} from '../protocol/index.ts';
import {
  activateReleaseKey,
  initAuthority,
  initReleaseSigning,
  issueAggregator,
  issueVehicle,
  releaseKeyPath,
  retireReleaseKey,
  rotateReleaseKey,
  type IssuedFiles,
} from '../scripts/provision/index.ts';
import { VehicleAgent, type AgentEvents } from '../vehicle-agent/index.ts';
import { connectClient, publishRetained } from './release-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BASE_WEIGHTS = path.join(
  REPOSITORY_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const FLEET_ID = 'rotation-fleet';
const VEHICLE_ID = 'veh-rot';
const EVENT_TIMEOUT_MS = 60_000;
const silent = createLogger({ level: 'silent' });
const topics = new FleetTopics(FLEET_ID);

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

function trustedKeyIds(file: string): string[] {
  return [...readPublicKeys(file).keys()].sort();
}

describe('release key rotation', () => {
  let workDir: string;
  let pkiDir: string;
  let broker: RunningBroker;
  let frames: LabelledImages;
  let vehicle: IssuedFiles;
  let aggregatorConfig: string;
  let oldKeyId: string;
  let newKeyId: string;
  let oldKey: SigningKey;
  let agent: VehicleAgent | undefined;
  let aggregator: Aggregator | undefined;

  function aggregatorOptions(
    signing: SigningFiles,
    overrides: Partial<AggregatorOptions>,
  ): AggregatorOptions {
    return {
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, 'aggregator'),
      baseWeightsPath: BASE_WEIGHTS,
      trainableLayers: ['dense2'],
      releaseSigningKeyPath: signing.releaseSigningKeyPath,
      vehicleKeysPath: signing.vehicleKeysPath,
      roundTimeoutMs: 30_000,
      log: silent,
      ...overrides,
    };
  }

  function startAgent(): Promise<void> {
    const signing = readSigningConfig(vehicle.configPath!);
    agent = new VehicleAgent({
      vehicleId: VEHICLE_ID,
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, 'vehicle'),
      frames,
      updateSigningKeyPath: signing.updateSigningKeyPath,
      trustedReleaseKeysPath: signing.trustedReleaseKeysPath,
      log: silent,
    });
    return agent.start();
  }

  before(async () => {
    workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-rotation-'));
    pkiDir = path.join(workDir, 'pki');
    const authority = await initAuthority(pkiDir, { fleetId: FLEET_ID });
    oldKeyId = initReleaseSigning(pkiDir);
    oldKey = loadSigningKey(releaseKeyPath(pkiDir, oldKeyId));
    const brokerUrl = 'mqtts://127.0.0.1:8883';
    aggregatorConfig = (await issueAggregator(authority, { brokerUrl }))
      .configPath!;
    vehicle = await issueVehicle(authority, {
      vehicleId: VEHICLE_ID,
      brokerUrl,
    });
    broker = await startBroker({ port: 0, log: silent });
    frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: 120,
    });
  });

  after(async () => {
    await aggregator?.stop();
    await agent?.stop();
    await broker?.close();
    rmSync(workDir, { recursive: true, force: true });
  });

  test('vehicle trusts old and new key', async () => {
    newKeyId = rotateReleaseKey(pkiDir);
    const trustedPath = readSigningConfig(
      vehicle.configPath!,
    ).trustedReleaseKeysPath!;

    assert.deepEqual(trustedKeyIds(trustedPath), [oldKeyId, newKeyId].sort());
    assert.equal(
      readSigningConfig(aggregatorConfig).releaseSigningKeyPath,
      releaseKeyPath(pkiDir, oldKeyId),
    );

    await startAgent();
    // No round opens: the aggregator waits for two vehicles.
    aggregator = new Aggregator(
      aggregatorOptions(readSigningConfig(aggregatorConfig), {
        minVehiclesOnline: 2,
        onlineWaitTimeoutMs: 600_000,
      }),
    );
    const deployed = nextEvent(agent!, 'release-deployed');
    await aggregator.start();

    assert.equal((await deployed).version, 0);
    await aggregator.stop();
    aggregator = undefined;
  });

  test('aggregator switches to new key', async () => {
    activateReleaseKey(pkiDir, newKeyId);
    const signing = readSigningConfig(aggregatorConfig);
    aggregator = new Aggregator(
      aggregatorOptions(signing, { minVehiclesOnline: 1, maxRounds: 1 }),
    );
    const deployedV1 = nextEvent(agent!, 'release-deployed');
    const accepted = new Promise<boolean>((resolve) =>
      aggregator!.once('update-decided', (event) => resolve(event.accepted)),
    );

    await aggregator.start();

    assert.equal(
      signing.releaseSigningKeyPath,
      releaseKeyPath(pkiDir, newKeyId),
    );
    assert.equal(aggregator.options.releaseSigningKey?.keyId, newKeyId);
    assert.equal(await accepted, true);
    assert.equal((await deployedV1).version, 1);
    assert.equal(agent!.counters.releasesRejected, 0);
    await aggregator.whenFinished();
    await aggregator.stop();
    aggregator = undefined;
  });

  test('retired old key rejected', async () => {
    retireReleaseKey(pkiDir, oldKeyId);
    const trustedPath = readSigningConfig(
      vehicle.configPath!,
    ).trustedReleaseKeysPath!;
    await agent!.stop();
    await startAgent();
    await nextEvent(agent!, 'connected');
    // The retired key still exists wherever it leaked. It signs a newer
    // notice than any the vehicle has seen.
    const onnx = exportOnnx(readWeightsFile(BASE_WEIGHTS));
    const encoded = encodeRelease(
      {
        modelName: MODEL_NAME,
        version: 2,
        parentVersion: 1,
        round: 2,
        createdAtMs: Date.now(),
        numVehicles: 1,
        numExamples: 1,
        testAccuracy: 0,
      },
      onnx,
      64 * 1024 * 1024,
    );
    const thief = new ReleaseSigner(
      oldKey,
      path.join(workDir, 'thief'),
      silent,
    );
    const notice = thief.sign(encoded.release, 64 * 1024 * 1024).notice;
    const rejected = nextEvent(agent!, 'release-rejected');
    const client = await connectClient(broker.port);
    await publishRetained(client, topics.release(), notice);
    await endClient(client, 2000);

    assert.deepEqual(trustedKeyIds(trustedPath), [newKeyId]);
    assert.equal(existsSync(releaseKeyPath(pkiDir, oldKeyId)), false);
    assert.equal((await rejected).code, ErrorCode.UnknownKey);
    assert.equal(agent!.deployedVersion, 1);
    const list = JSON.parse(
      readFileSync(path.join(pkiDir, 'release-keys.json'), 'utf8'),
    );
    assert.equal(list.activeKeyId, newKeyId);
  });
});
