import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  Aggregator,
  type RoundClosedEvent,
  type UpdateDecidedEvent,
} from '../aggregator/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { MODEL_NAME, TENSOR_SPECS } from '../models/architecture.ts';
import {
  loadLabelledImages,
  resolveDataDir,
  type LabelledImages,
} from '../models/index.ts';
import {
  ErrorCode,
  FleetError,
  FleetTopics,
  createLogger,
  decodeSignedUpdate,
  encodeFloat32Tensor,
  encodeModelUpdate,
  encodeSignedUpdate,
  loadSigningKey,
  readSigningConfig,
  type ModelUpdate,
  type SigningKey,
  type UpdateAck,
} from '../protocol/index.ts';
import {
  initAuthority,
  initReleaseSigning,
  issueAggregator,
  issueVehicle,
  type IssuedFiles,
} from '../scripts/provision/index.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import { connectClient } from './release-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BASE_WEIGHTS = path.join(
  REPOSITORY_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const FLEET_ID = 'signed-updates';
const silent = createLogger({ level: 'silent' });
const topics = new FleetTopics(FLEET_ID);

function isInvalidConfig(err: unknown): true {
  assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
  assert.equal(err.code, ErrorCode.InvalidConfig);
  return true;
}

/** Builds a well-formed update of `round` for dense2, with small deltas. */
function forgedUpdate(
  updateId: string,
  vehicleId: string,
  round: number,
): ModelUpdate {
  const deltas = TENSOR_SPECS.filter((spec) =>
    spec.name.startsWith('dense2'),
  ).map((spec) =>
    encodeFloat32Tensor(
      spec.name,
      spec.shape,
      new Float32Array(spec.shape.reduce((a, b) => a * b, 1)).fill(0.5),
    ),
  );
  return {
    updateId,
    vehicleId,
    modelName: MODEL_NAME,
    baseModelVersion: 0,
    round,
    numExamples: 1000,
    deltas,
    metrics: {
      trainLoss: 0,
      trainAccuracy: 1,
      trainDurationMs: 1,
      backend: 'forged',
    },
    createdAtMs: Date.now(),
  };
}

function sign(key: SigningKey, update: ModelUpdate): Uint8Array {
  return encodeSignedUpdate(key.envelope('update', encodeModelUpdate(update)));
}

describe('signed updates at the aggregator', () => {
  let workDir: string;
  let pkiDir: string;
  let broker: RunningBroker;
  let frames: LabelledImages;
  let genuine: IssuedFiles;
  let other: IssuedFiles;
  let aggregatorConfig: string;

  before(async () => {
    workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-signed-updates-'));
    pkiDir = path.join(workDir, 'pki');
    const authority = await initAuthority(pkiDir, { fleetId: FLEET_ID });
    initReleaseSigning(pkiDir);
    const brokerUrl = 'mqtts://127.0.0.1:8883';
    aggregatorConfig = (await issueAggregator(authority, { brokerUrl }))
      .configPath!;
    genuine = await issueVehicle(authority, { vehicleId: 'veh-a', brokerUrl });
    other = await issueVehicle(authority, { vehicleId: 'veh-b', brokerUrl });
    broker = await startBroker({ port: 0, log: silent });
    frames = await loadLabelledImages(resolveDataDir(), {
      split: 'train',
      limit: 120,
    });
  });

  after(async () => {
    await broker?.close();
    rmSync(workDir, { recursive: true, force: true });
  });

  test('forged updates rejected, genuine accepted', async () => {
    const signing = readSigningConfig(aggregatorConfig);
    const aggregator = new Aggregator({
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, 'aggregator'),
      baseWeightsPath: BASE_WEIGHTS,
      trainableLayers: ['dense2'],
      vehicleKeysPath: signing.vehicleKeysPath,
      maxRounds: 1,
      roundTimeoutMs: 30_000,
      log: silent,
    });
    const vehicleSigning = readSigningConfig(genuine.configPath!);
    const agent = new VehicleAgent({
      vehicleId: 'veh-a',
      fleetId: FLEET_ID,
      brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
      stateDir: path.join(workDir, 'veh-a'),
      frames,
      updateSigningKeyPath: vehicleSigning.updateSigningKeyPath,
      log: silent,
    });
    const ownKey = loadSigningKey(genuine.updateSigningKeyPath!);
    const otherKey = loadSigningKey(other.updateSigningKeyPath!);
    const decided: UpdateDecidedEvent[] = [];
    aggregator.on('update-decided', (event) => decided.push(event));
    const closed = new Promise<RoundClosedEvent>((resolve) =>
      aggregator.once('round-closed', resolve),
    );
    // The aggregator acks the forged updates on veh-a's ack topic too.
    const ownAck = new Promise<UpdateAck>((resolve) =>
      agent.on('ack', (ack) => {
        if (!/^(forged|unknown)/.test(ack.updateId)) resolve(ack);
      }),
    );
    const attacker = await connectClient(broker.port);
    aggregator.once('round-opened', ({ round }) => {
      const tampered = decodeSignedUpdate(
        sign(ownKey, forgedUpdate('forged-tampered', 'veh-a', round)),
      )!;
      const bytes = Uint8Array.from(tampered.signedBytes);
      bytes[bytes.length - 40] ^= 0x10;
      const payloads = [
        sign(otherKey, forgedUpdate('forged-other-key', 'veh-a', round)),
        encodeModelUpdate(forgedUpdate('forged-unsigned', 'veh-a', round)),
        encodeSignedUpdate({ ...tampered, signedBytes: bytes }),
      ];
      for (const payload of payloads) {
        void attacker.publishAsync(
          topics.update('veh-a'),
          Buffer.from(payload),
          { qos: 1 },
        );
      }
    });

    let ack: UpdateAck | undefined;
    try {
      await agent.start();
      await aggregator.start();
      await aggregator.whenFinished();
      ack = await ownAck;
      // The forged updates may still be on their way once the round closed.
      const deadline = Date.now() + 10_000;
      while (decided.length < 4 && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    } finally {
      await aggregator.stop();
      await agent.stop();
      await endClient(attacker, 2000);
    }

    const round = await closed;
    const codes = decided
      .filter((event) => !event.accepted)
      .map((event) => event.reasonCode)
      .sort();
    assert.deepEqual(codes, [
      ErrorCode.InvalidSignature,
      ErrorCode.NotSigned,
      ErrorCode.SignerMismatch,
    ]);
    const accepted = decided.filter((event) => event.accepted);
    assert.equal(accepted.length, 1);
    assert.notEqual(accepted[0].updateId?.startsWith('forged'), true);
    assert.equal(round.accepted, 1);
    assert.equal(round.modelVersion, 1);
    assert.equal(ack?.updateId, accepted[0].updateId);
    assert.equal(ack?.reasonCode, '');
  });

  test('agent rejects update key mode 0644', () => {
    const keyPath = other.updateSigningKeyPath!;
    chmodSync(keyPath, 0o644);

    try {
      assert.throws(
        () =>
          new VehicleAgent({
            vehicleId: 'veh-b',
            fleetId: FLEET_ID,
            brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
            stateDir: path.join(workDir, 'veh-b'),
            frames,
            updateSigningKeyPath: keyPath,
            log: silent,
          }),
        isInvalidConfig,
      );
    } finally {
      chmodSync(keyPath, 0o600);
    }
  });

  test('aggregator rejects release key mode 0644', () => {
    const keyPath = readSigningConfig(aggregatorConfig).releaseSigningKeyPath!;
    chmodSync(keyPath, 0o644);

    try {
      assert.throws(
        () =>
          new Aggregator({
            fleetId: FLEET_ID,
            brokerUrl: `mqtt://127.0.0.1:${broker.port}`,
            stateDir: path.join(workDir, 'aggregator-loose'),
            baseWeightsPath: BASE_WEIGHTS,
            releaseSigningKeyPath: keyPath,
            log: silent,
          }),
        isInvalidConfig,
      );
    } finally {
      chmodSync(keyPath, 0o600);
    }
  });

  test('command lines reject loose key files', () => {
    const agentKey = other.updateSigningKeyPath!;
    const releaseKey =
      readSigningConfig(aggregatorConfig).releaseSigningKeyPath!;
    chmodSync(agentKey, 0o640);
    chmodSync(releaseKey, 0o604);
    const run = (script: string, args: string[]) =>
      spawnSync(
        process.execPath,
        ['--import', 'tsx', path.join(REPOSITORY_ROOT, script), ...args],
        { cwd: REPOSITORY_ROOT, encoding: 'utf8', timeout: 60_000 },
      );

    try {
      const agentRun = run('vehicle-agent/main.ts', [
        'run',
        '--vehicle-id',
        'veh-b',
        '--fleet-id',
        FLEET_ID,
        '--update-signing-key',
        agentKey,
        '--data',
        resolveDataDir(),
        '--state-dir',
        path.join(workDir, 'cli-agent'),
      ]);
      const aggregatorRun = run('aggregator/main.ts', [
        '--config',
        aggregatorConfig,
        '--state-dir',
        path.join(workDir, 'cli-aggregator'),
      ]);

      assert.equal(agentRun.status, 2, agentRun.stderr);
      assert.match(agentRun.stdout, /invalid agent options/);
      assert.match(agentRun.stdout, /chmod 600/);
      assert.equal(aggregatorRun.status, 2, aggregatorRun.stderr);
      assert.match(aggregatorRun.stdout, /INVALID_CONFIG/);
      assert.doesNotMatch(
        agentRun.stdout + aggregatorRun.stdout,
        /PRIVATE KEY/,
      );
    } finally {
      chmodSync(agentKey, 0o600);
      chmodSync(releaseKey, 0o600);
    }
  });
});
