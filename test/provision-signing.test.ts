import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  ErrorCode,
  FleetError,
  loadSigningKey,
  readPublicKeys,
  readSigningConfig,
} from '../protocol/index.ts';
import {
  initAuthority,
  initReleaseSigning,
  issueAggregator,
  issueVehicle,
  readReleaseKeyList,
  releaseKeyPath,
  retireReleaseKey,
  signingPaths,
  type FleetAuthority,
} from '../scripts/provision/index.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BROKER_URL = 'mqtts://127.0.0.1:8883';

function modeOf(file: string): number {
  return statSync(file).mode & 0o777;
}

function isInvalidConfig(err: unknown): true {
  assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
  assert.equal(err.code, ErrorCode.InvalidConfig);
  return true;
}

describe('signing provisioning', () => {
  let dir: string;
  let authority: FleetAuthority;
  let releaseKeyId: string;

  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-provision-signing-'));
    authority = await initAuthority(path.join(dir, 'pki'), {
      fleetId: 'sign-fleet',
    });
    releaseKeyId = initReleaseSigning(authority.dir);
  });

  after(() => rmSync(dir, { recursive: true, force: true }));

  test('release key written with mode 0600', () => {
    const keyPath = releaseKeyPath(authority.dir, releaseKeyId);
    const list = readReleaseKeyList(authority.dir)!;

    assert.equal(modeOf(keyPath), 0o600);
    assert.equal(loadSigningKey(keyPath).keyId, releaseKeyId);
    assert.equal(list.activeKeyId, releaseKeyId);
    assert.deepEqual(
      [...readPublicKeys(signingPaths(authority.dir).releaseKeyList).keys()],
      [releaseKeyId],
    );
    assert.throws(() => initReleaseSigning(authority.dir), isInvalidConfig);
  });

  test('vehicle update key registered', async () => {
    const files = await issueVehicle(authority, {
      vehicleId: 'veh-7',
      brokerUrl: BROKER_URL,
    });
    const signing = readSigningConfig(files.configPath!);
    const registered = readPublicKeys(
      signingPaths(authority.dir).vehicleKeyFolder,
    );

    assert.equal(signing.updateSigningKeyPath, files.updateSigningKeyPath);
    assert.equal(modeOf(files.updateSigningKeyPath!), 0o600);
    assert.equal(
      loadSigningKey(files.updateSigningKeyPath!).keyId,
      files.updateKeyId,
    );
    assert.equal(registered.get(files.updateKeyId!)?.vehicleId, 'veh-7');
    assert.deepEqual(
      [...readPublicKeys(signing.trustedReleaseKeysPath!).keys()],
      [releaseKeyId],
    );
  });

  test('aggregator config names key files', async () => {
    const files = await issueAggregator(authority, { brokerUrl: BROKER_URL });
    const signing = readSigningConfig(files.configPath!);

    assert.equal(
      signing.releaseSigningKeyPath,
      releaseKeyPath(authority.dir, releaseKeyId),
    );
    assert.equal(
      signing.vehicleKeysPath,
      signingPaths(authority.dir).vehicleKeyFolder,
    );
    const stored = JSON.parse(readFileSync(files.configPath!, 'utf8'));
    assert.equal(stored.vehicleKeysPath, 'vehicle-keys');
  });

  test('active release key cannot retire', () => {
    assert.throws(
      () => retireReleaseKey(authority.dir, releaseKeyId),
      isInvalidConfig,
    );
  });
});

describe('signing command line', () => {
  let dir: string;

  const provision = (args: string[]) =>
    spawnSync(
      process.execPath,
      ['--import', 'tsx', 'scripts/provision.ts', '--dir', dir, ...args],
      { cwd: REPO_ROOT, encoding: 'utf8', timeout: 30_000 },
    );

  before(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-signing-cli-'));
  });

  after(() => rmSync(dir, { recursive: true, force: true }));

  test('cli rotates release key', () => {
    const steps = [
      provision(['init-ca', '--fleet-id', 'cli-sign']),
      provision(['issue-aggregator']),
      provision(['issue-vehicle', '--id', 'veh-1']),
    ];
    const rotate = provision(['rotate-release-key']);
    const oldKeyId = readReleaseKeyList(dir)!.keys[0].keyId;
    const newKeyId = /added release-signing key (\w+)/.exec(rotate.stdout)?.[1];
    const activate = provision(['activate-release-key', '--key-id', newKeyId!]);
    const retire = provision(['retire-release-key', '--key-id', oldKeyId]);

    for (const step of [...steps, rotate, activate, retire]) {
      assert.equal(step.status, 0, step.stderr);
    }
    const trusted = readSigningConfig(
      path.join(dir, 'vehicles', 'veh-1', 'agent.json'),
    ).trustedReleaseKeysPath!;
    const aggregator = readSigningConfig(
      path.join(dir, 'aggregator', 'aggregator.json'),
    );
    assert.deepEqual([...readPublicKeys(trusted).keys()], [newKeyId]);
    assert.equal(
      aggregator.releaseSigningKeyPath,
      releaseKeyPath(dir, newKeyId!),
    );
    assert.equal(existsSync(releaseKeyPath(dir, oldKeyId)), false);
  });

  test('cli revoke removes update key', () => {
    const keyFile = path.join(signingPaths(dir).vehicleKeyFolder, 'veh-1.json');
    const before = existsSync(keyFile);

    const revoke = provision(['revoke', '--id', 'veh-1']);

    assert.equal(revoke.status, 0, revoke.stderr);
    assert.equal(before, true);
    assert.equal(existsSync(keyFile), false);
    assert.match(revoke.stdout, /removed the update key of vehicle veh-1/);
  });
});
