import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { readUsersFile, verifyPassword } from '../broker/index.ts';
import { parseRevocationList } from '../broker/crl.ts';
import {
  ErrorCode,
  FleetError,
  assertPrivateKeyFile,
  formatIdentityUri,
  identitiesOfCertificate,
  loadClientTls,
  parseIdentityUri,
  readClientConfig,
} from '../protocol/index.ts';
import {
  authorityPaths,
  initAuthority,
  issueAggregator,
  issueBroker,
  issueVehicle,
  revokeCertificates,
  type FleetAuthority,
} from '../scripts/provision/index.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BROKER_URL = 'mqtts://127.0.0.1:8883';

function isInvalidConfig(err: unknown): boolean {
  return err instanceof FleetError && err.code === ErrorCode.InvalidConfig;
}

function modeOf(file: string): number {
  return statSync(file).mode & 0o777;
}

describe('provisioning', () => {
  let dir: string;
  let authority: FleetAuthority;

  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-provision-'));
    authority = await initAuthority(path.join(dir, 'pki'), {
      fleetId: 'prov-fleet',
    });
  });

  after(() => rmSync(dir, { recursive: true, force: true }));

  test('init-ca writes key with mode 0600', () => {
    const paths = authorityPaths(authority.dir);
    const certificate = new X509Certificate(readFileSync(paths.certificate));
    const key = createPrivateKey(readFileSync(paths.privateKey));

    assert.equal(modeOf(paths.privateKey), 0o600);
    assert.equal(modeOf(paths.folder), 0o700);
    assert.equal(certificate.ca, true);
    assert.equal(certificate.checkPrivateKey(key), true);
    assert.equal(key.asymmetricKeyDetails?.namedCurve, 'prime256v1');
    const crl = parseRevocationList(readFileSync(paths.crl), paths.crl);
    assert.equal(crl.revokedSerials.size, 0);
    assert.ok(crl.nextUpdate!.getTime() > Date.now() + 80 * 86_400_000);
  });

  test('init-ca rejects an existing ca', async () => {
    await assert.rejects(
      initAuthority(authority.dir, { fleetId: 'prov-fleet' }),
      isInvalidConfig,
    );
  });

  test('vehicle certificate carries identity', async () => {
    const files = await issueVehicle(authority, {
      vehicleId: 'veh-001',
      brokerUrl: BROKER_URL,
    });
    const certificate = new X509Certificate(
      readFileSync(files.certificatePath),
    );
    const ca = new X509Certificate(readFileSync(files.caPath));
    const config = readClientConfig(files.configPath!);

    assert.deepEqual(identitiesOfCertificate(certificate.raw), [
      { role: 'vehicle', fleetId: 'prov-fleet', vehicleId: 'veh-001' },
    ]);
    assert.match(certificate.subject, /CN=vehicle-veh-001/);
    assert.equal(certificate.verify(ca.publicKey), true);
    assert.deepEqual(certificate.keyUsage, ['1.3.6.1.5.5.7.3.2']);
    assert.equal(modeOf(files.privateKeyPath), 0o600);
    assert.deepEqual(config, {
      brokerUrl: BROKER_URL,
      fleetId: 'prov-fleet',
      vehicleId: 'veh-001',
      tls: {
        caPath: files.caPath,
        certPath: files.certificatePath,
        keyPath: files.privateKeyPath,
      },
    });
    const stored = JSON.parse(readFileSync(files.configPath!, 'utf8'));
    assert.equal(stored.keyPath, 'vehicle.key.pem');
    assert.ok(loadClientTls(config.tls).key.length > 0);
  });

  test('aggregator certificate carries identity', async () => {
    const files = await issueAggregator(authority, { brokerUrl: BROKER_URL });
    const config = readClientConfig(files.configPath!);

    assert.deepEqual(
      identitiesOfCertificate(readFileSync(files.certificatePath)),
      [{ role: 'aggregator', fleetId: 'prov-fleet' }],
    );
    assert.equal(config.vehicleId, undefined);
    assert.equal(config.fleetId, 'prov-fleet');
  });

  test('broker certificate names its hosts', async () => {
    const files = await issueBroker(authority, {
      hosts: ['127.0.0.1', 'broker.fleet.test'],
    });
    const certificate = new X509Certificate(
      readFileSync(files.certificatePath),
    );

    assert.equal(certificate.checkIP('127.0.0.1'), '127.0.0.1');
    assert.equal(
      certificate.checkHost('broker.fleet.test'),
      'broker.fleet.test',
    );
    assert.deepEqual(certificate.keyUsage, ['1.3.6.1.5.5.7.3.1']);
    assert.deepEqual(identitiesOfCertificate(certificate.raw), []);
  });

  test('revoke lists serial in crl', async () => {
    const files = await issueVehicle(authority, {
      vehicleId: 'veh-002',
      brokerUrl: BROKER_URL,
    });
    const crlNumberBefore = authority.state.crlNumber;

    const revoked = await revokeCertificates(
      authority,
      { vehicleId: 'veh-002' },
      'keyCompromise',
    );
    const crlPath = authorityPaths(authority.dir).crl;
    const crl = parseRevocationList(readFileSync(crlPath), crlPath);

    assert.deepEqual(
      revoked.map((entry) => entry.serial),
      [files.serial],
    );
    assert.ok(crl.revokedSerials.has(files.serial.replace(/^0+/, '')));
    assert.equal(authority.state.crlNumber, crlNumberBefore + 1);
    await assert.rejects(
      revokeCertificates(authority, { vehicleId: 'veh-002' }),
      isInvalidConfig,
    );
  });

  test(
    'openssl verifies issued chain',
    { skip: spawnSync('openssl', ['version']).status !== 0 && 'no openssl' },
    async () => {
      const good = await issueVehicle(authority, {
        vehicleId: 'veh-003',
        brokerUrl: BROKER_URL,
      });
      const bad = await issueVehicle(authority, {
        vehicleId: 'veh-004',
        brokerUrl: BROKER_URL,
      });
      await revokeCertificates(authority, { vehicleId: 'veh-004' });
      const paths = authorityPaths(authority.dir);
      const verify = (certificate: string) =>
        spawnSync(
          'openssl',
          [
            'verify',
            '-crl_check',
            '-CAfile',
            paths.certificate,
            '-CRLfile',
            paths.crl,
            certificate,
          ],
          { encoding: 'utf8' },
        );

      const accepted = verify(good.certificatePath);
      const rejected = verify(bad.certificatePath);

      assert.equal(accepted.status, 0, accepted.stderr);
      assert.notEqual(rejected.status, 0);
      assert.match(rejected.stdout + rejected.stderr, /certificate revoked/);
    },
  );

  test('vehicle id dot-dot rejected', async () => {
    await assert.rejects(
      issueVehicle(authority, { vehicleId: '..', brokerUrl: BROKER_URL }),
      RangeError,
    );
  });
});

describe('identity uris', () => {
  test('identity uri round trip', () => {
    const identities = [
      { role: 'vehicle' as const, fleetId: 'f', vehicleId: 'veh-001' },
      { role: 'vehicle' as const, fleetId: 'a:b', vehicleId: 'c:d e' },
      { role: 'aggregator' as const, fleetId: 'fleet-7' },
    ];

    for (const identity of identities) {
      const uri = formatIdentityUri(identity);
      assert.deepEqual(parseIdentityUri(uri), identity, uri);
    }
    assert.equal(
      formatIdentityUri(identities[1]),
      'urn:fleetlearn:a%3Ab:vehicle:c%3Ad%20e',
    );
  });

  test('identity uri rejects others', () => {
    const uris = [
      'urn:fleetlearn:f:vehicle',
      'urn:fleetlearn:f:broker',
      'urn:fleetlearn:f:vehicle:a%2Fb',
      'urn:fleetlearn:f:vehicle:%E0',
      'urn:other:f:aggregator',
      'urn:fleetlearn::aggregator',
      'https://example.test/',
    ];

    for (const uri of uris) assert.equal(parseIdentityUri(uri), undefined, uri);
  });

  test('private key mode 0644 rejected', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-key-'));
    const keyPath = path.join(dir, 'key.pem');
    writeFileSync(keyPath, 'not a key', { mode: 0o600 });

    assert.doesNotThrow(() => assertPrivateKeyFile(keyPath));
    chmodSync(keyPath, 0o644);
    assert.throws(() => assertPrivateKeyFile(keyPath), isInvalidConfig);
    assert.throws(
      () => assertPrivateKeyFile(path.join(dir, 'missing.pem')),
      isInvalidConfig,
    );
    rmSync(dir, { recursive: true, force: true });
  });

  test('client config missing field rejected', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-config-'));
    const file = path.join(dir, 'agent.json');
    writeFileSync(file, JSON.stringify({ brokerUrl: BROKER_URL }));

    assert.throws(() => readClientConfig(file), isInvalidConfig);
    writeFileSync(file, '{ not json');
    assert.throws(() => readClientConfig(file), isInvalidConfig);
    rmSync(dir, { recursive: true, force: true });
  });
});

describe('provision command line', () => {
  let dir: string;

  const provision = (args: string[], input?: string) =>
    spawnSync(
      process.execPath,
      ['--import', 'tsx', 'scripts/provision.ts', '--dir', dir, ...args],
      { cwd: REPO_ROOT, encoding: 'utf8', input, timeout: 30_000 },
    );

  before(() => {
    dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-provision-cli-'));
  });

  after(() => rmSync(dir, { recursive: true, force: true }));

  test('cli reports error without ca', () => {
    const result = provision(['issue-vehicle', '--id', 'veh-1']);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /^error: no fleet CA in /);
  });

  test('cli issues and revokes vehicle', () => {
    const init = provision(['init-ca', '--fleet-id', 'cli-fleet']);
    const issue = provision(['issue-vehicle', '--id', 'veh-1']);
    const revoke = provision(['revoke', '--id', 'veh-1']);

    assert.equal(init.status, 0, init.stderr);
    assert.equal(issue.status, 0, issue.stderr);
    assert.equal(revoke.status, 0, revoke.stderr);
    assert.match(issue.stdout, /issued vehicle veh-1 certificate/);
    assert.match(revoke.stdout, /revoked vehicle veh-1/);
    const config = readClientConfig(
      path.join(dir, 'vehicles', 'veh-1', 'agent.json'),
    );
    assert.equal(config.fleetId, 'cli-fleet');
    assert.equal(modeOf(config.tls.keyPath), 0o600);
  });

  test('cli add-user hashes piped password', async () => {
    const usersPath = path.join(dir, 'users.json');
    const password = 'piped password 9';

    const result = provision(
      [
        'add-user',
        '--users',
        usersPath,
        '--username',
        'dev-1',
        '--role',
        'vehicle',
        '--id',
        'veh-1',
      ],
      `${password}\n`,
    );

    assert.equal(result.status, 0, result.stderr);
    assert.ok(existsSync(usersPath));
    assert.equal(modeOf(usersPath), 0o600);
    assert.ok(!readFileSync(usersPath, 'utf8').includes(password));
    const [user] = readUsersFile(usersPath).users;
    assert.deepEqual(user.identity, {
      role: 'vehicle',
      fleetId: 'cli-fleet',
      vehicleId: 'veh-1',
    });
    assert.equal(await verifyPassword(user, password), true);
    assert.equal(await verifyPassword(user, 'piped password 8'), false);
  });
});
