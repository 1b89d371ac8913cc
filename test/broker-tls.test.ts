import assert from 'node:assert/strict';
import { once } from 'node:events';
import { chmodSync, copyFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  Aggregator,
  type AggregatorOptions,
  type RoundClosedEvent,
} from '../aggregator/index.ts';
import { startBroker, type RunningBroker } from '../broker/index.ts';
import { warnAboutWeakSettings } from '../broker/broker.ts';
import { loadLabelledImages, subset } from '../models/index.ts';
import {
  ErrorCode,
  FleetError,
  createLogger,
  toMqttSecurityOptions,
} from '../protocol/index.ts';
import { revokeCertificates } from '../scripts/provision/index.ts';
import { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  brokerTlsOf,
  captureLog,
  clientTlsOf,
  createTestPki,
  tlsClientOptions,
  tryConnect,
  waitForClose,
  type CapturedLog,
  type TestPki,
} from './tls-fixtures.ts';
import { endClient } from '../protocol/mqtt-end.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  path.resolve(REPO_ROOT, '../shared/data/gtsrb32');
const BASE_WEIGHTS = path.join(
  REPO_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const FLEET_ID = 'tls-fleet';
const silent = createLogger({ level: 'silent' });

/** Rejects when `promise` has not settled within `timeoutMs`. */
async function within<T>(
  promise: Promise<T>,
  timeoutMs: number,
  what: string,
): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`timed out after ${timeoutMs} ms: ${what}`)),
      timeoutMs,
    );
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

let pki: TestPki;

before(async () => {
  pki = await createTestPki(FLEET_ID, [
    'veh-001',
    'veh-002',
    'veh-revoked',
    'veh-late',
  ]);
});

after(() => pki.remove());

describe('broker mutual tls', () => {
  let broker: RunningBroker;
  let captured: CapturedLog;
  let url: string;

  before(async () => {
    await revokeCertificates(pki.authority, { vehicleId: 'veh-revoked' });
    captured = captureLog();
    broker = await startBroker({
      port: 0,
      log: captured.log,
      tls: brokerTlsOf(pki),
    });
    url = `mqtts://127.0.0.1:${broker.port}`;
  });

  after(() => broker.close());

  test('fleet certificate connects over mqtts', async () => {
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-001',
      ...tlsClientOptions(pki.vehicles.get('veh-001')!),
    });

    assert.equal(outcome.connected, true, String(outcome.error));
    assert.equal(broker.secure, true);
    const line = await captured.waitFor('client authenticated');
    assert.equal(line.identity, 'urn:fleetlearn:tls-fleet:vehicle:veh-001');
    assert.equal(line.method, 'certificate');

    await endClient(outcome.client, 2000);
  });

  test('client without certificate rejected', async () => {
    const vehicle = pki.vehicles.get('veh-001')!;
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-001',
      ...toMqttSecurityOptions({
        tls: { ...clientTlsOf(vehicle), cert: undefined!, key: undefined! },
      }),
    });

    assert.equal(outcome.connected, false);
    await captured.waitFor('client certificate missing');
  });

  test('certificate from another ca rejected', async () => {
    const foreign = clientTlsOf(pki.foreignVehicle);
    const trusted = clientTlsOf(pki.vehicles.get('veh-001')!);
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-001',
      ...toMqttSecurityOptions({ tls: { ...foreign, ca: trusted.ca } }),
    });

    assert.equal(outcome.connected, false);
    const line = await captured.waitFor('client certificate rejected');
    assert.match(String(line.reason), /UNABLE_TO_(VERIFY_LEAF|GET_ISSUER)/);
  });

  test('revoked certificate rejected', async () => {
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-revoked',
      ...tlsClientOptions(pki.vehicles.get('veh-revoked')!),
    });

    assert.equal(outcome.connected, false);
    await captured.waitFor(
      'client certificate rejected',
      (line) => line.reason === 'CERT_REVOKED',
    );
  });

  test('reload closes revoked connection', async () => {
    const files = pki.vehicles.get('veh-late')!;
    const options = {
      clientId: 'vehicle-veh-late',
      ...tlsClientOptions(files),
    };
    const first = await tryConnect(url, options);
    assert.equal(first.connected, true, String(first.error));
    const closed = waitForClose(first.client);

    await revokeCertificates(pki.authority, { vehicleId: 'veh-late' });
    const result = broker.reloadCredentials();
    await closed;
    const second = await tryConnect(url, options);

    assert.equal(result.closedClients, 1);
    assert.equal(second.connected, false);
    await captured.waitFor('client disconnected, credentials revoked');
  });

  test('client rejects untrusted broker certificate', async () => {
    const vehicle = clientTlsOf(pki.vehicles.get('veh-001')!);
    const foreign = clientTlsOf(pki.foreignVehicle);
    const outcome = await tryConnect(url, {
      clientId: 'vehicle-veh-001',
      ...toMqttSecurityOptions({ tls: { ...vehicle, ca: foreign.ca } }),
    });

    // The broker sends its CA along, which the client does not trust.
    assert.equal(outcome.connected, false);
    assert.match(
      String(outcome.error?.code),
      /SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_VERIFY_LEAF_SIGNATURE/,
    );
  });
});

describe('broker listener settings', () => {
  test('plain tcp warns off loopback', () => {
    const captured = captureLog();

    // Only the warning logic runs here; nothing listens on this address.
    warnAboutWeakSettings({}, false, false, '192.0.2.10', captured.log);
    warnAboutWeakSettings({}, false, false, '127.0.0.1', captured.log);

    const warnings = captured.lines.filter((line) => line.level === 40);
    assert.equal(warnings.length, 2);
    assert.match(String(warnings[0].msg), /without tls on a non-loopback/);
    assert.match(String(warnings[1].msg), /no client authentication/);
    assert.equal(warnings[0].host, '192.0.2.10');
  });

  test('client ca without crl warns', async () => {
    const captured = captureLog();
    const broker = await startBroker({
      port: 0,
      log: captured.log,
      tls: brokerTlsOf(pki, { crlPath: undefined }),
    });

    await captured.waitFor(
      'broker has no crl; revoked client certificates are accepted',
    );

    await broker.close();
  });

  test('broker rejects key mode 0644', async () => {
    const keyPath = path.join(pki.dir, 'exposed-broker.key.pem');
    copyFileSync(pki.broker.privateKeyPath, keyPath);
    chmodSync(keyPath, 0o644);

    await assert.rejects(
      startBroker({ port: 0, log: silent, tls: brokerTlsOf(pki, { keyPath }) }),
      (err: unknown) =>
        err instanceof FleetError &&
        err.code === ErrorCode.InvalidConfig &&
        err.message.includes(keyPath),
    );
  });

  test('crl without ca rejected', async () => {
    const tls = brokerTlsOf(pki, {
      caPath: undefined,
      requireClientCertificate: false,
    });

    await assert.rejects(
      startBroker({ port: 0, log: silent, tls }),
      (err: unknown) =>
        err instanceof FleetError && err.code === ErrorCode.InvalidConfig,
    );
  });
});

describe('agent tls options', () => {
  const baseOptions = (): ConstructorParameters<typeof VehicleAgent>[0] => {
    const files = pki.vehicles.get('veh-001')!;
    return {
      vehicleId: 'veh-001',
      fleetId: FLEET_ID,
      brokerUrl: 'mqtts://127.0.0.1:8883',
      stateDir: path.join(pki.dir, 'agent-state'),
      dataDir: DATA_DIR,
      tls: {
        caPath: files.caPath,
        certPath: files.certificatePath,
        keyPath: files.privateKeyPath,
      },
      log: silent,
    };
  };

  test('agent rejects key mode 0644', () => {
    const options = baseOptions();
    const keyPath = path.join(pki.dir, 'exposed.key.pem');
    copyFileSync(options.tls!.keyPath, keyPath);
    chmodSync(keyPath, 0o644);

    assert.throws(
      () => new VehicleAgent({ ...options, tls: { ...options.tls!, keyPath } }),
      (err: unknown) => {
        assert.ok(err instanceof FleetError);
        assert.equal(err.code, ErrorCode.InvalidConfig);
        assert.ok(err.message.includes(keyPath), err.message);
        assert.match(err.message, /mode 0644/);
        assert.match(err.message, /chmod 600/);
        return true;
      },
    );
  });

  test('agent accepts its own certificate', () => {
    const agent = new VehicleAgent(baseOptions());

    assert.equal(agent.vehicleId, 'veh-001');
  });

  test('agent rejects another vehicle certificate', () => {
    const other = pki.vehicles.get('veh-002')!;
    const options = baseOptions();

    assert.throws(
      () =>
        new VehicleAgent({
          ...options,
          tls: {
            ...options.tls!,
            certPath: other.certificatePath,
            keyPath: other.privateKeyPath,
          },
        }),
      (err: unknown) =>
        err instanceof FleetError && err.code === ErrorCode.InvalidConfig,
    );
  });

  test('agent rejects tls with plain url', () => {
    assert.throws(
      () =>
        new VehicleAgent({
          ...baseOptions(),
          brokerUrl: 'mqtt://127.0.0.1:1883',
        }),
      RangeError,
    );
  });
});

describe('fleet over mutual tls', () => {
  test(
    'aggregator and two agents finish round',
    {
      timeout: 150_000,
    },
    async () => {
      const captured = captureLog();
      const broker = await startBroker({
        port: 0,
        log: captured.log,
        tls: brokerTlsOf(pki),
      });
      const brokerUrl = `mqtts://127.0.0.1:${broker.port}`;
      const frames = await loadLabelledImages(DATA_DIR, {
        split: 'train',
        limit: 400,
      });
      const testSplit = await loadLabelledImages(DATA_DIR, {
        split: 'test',
        limit: 100,
      });
      const aggregatorOptions: AggregatorOptions = {
        fleetId: FLEET_ID,
        brokerUrl,
        stateDir: path.join(pki.dir, 'aggregator-state'),
        baseWeightsPath: BASE_WEIGHTS,
        minVehiclesOnline: 2,
        minUpdates: 2,
        roundTimeoutMs: 60_000,
        maxRounds: 1,
        testSet: { images: testSplit.images, labels: testSplit.labels },
        log: silent,
      };
      const security = { security: { tls: clientTlsOf(pki.aggregator) } };
      const aggregator = new Aggregator({ ...aggregatorOptions, ...security });
      const agents = ['veh-001', 'veh-002'].map((vehicleId, index) => {
        const files = pki.vehicles.get(vehicleId)!;
        const half = Array.from({ length: 200 }, (_, i) => i + index * 200);
        return new VehicleAgent({
          vehicleId,
          fleetId: FLEET_ID,
          brokerUrl,
          stateDir: path.join(pki.dir, `agent-${vehicleId}`),
          frames: subset(frames, half),
          tls: {
            caPath: files.caPath,
            certPath: files.certificatePath,
            keyPath: files.privateKeyPath,
          },
          log: silent,
        });
      });
      const closed: RoundClosedEvent[] = [];
      aggregator.on('round-closed', (event) => closed.push(event));
      const versionOne = agents.map(
        (agent) =>
          new Promise<void>((resolve) =>
            agent.on('release-deployed', (event) => {
              if (event.version === 1) resolve();
            }),
          ),
      );
      let deployedVersions: (number | undefined)[] = [];

      try {
        const connected = agents.map((agent) => once(agent, 'connected'));
        await Promise.all(agents.map((agent) => agent.start()));
        await within(Promise.all(connected), 20_000, 'agents connected');
        await within(aggregator.start(), 20_000, 'aggregator started');
        await within(aggregator.whenFinished(), 60_000, 'round finished');
        await within(Promise.all(versionOne), 20_000, 'version 1 deployed');
        deployedVersions = agents.map((agent) => agent.deployedVersion);
      } finally {
        await aggregator.stop();
        await Promise.allSettled(agents.map((agent) => agent.stop()));
        await broker.close();
      }

      assert.equal(closed.length, 1);
      assert.equal(closed[0].accepted, 2);
      assert.equal(closed[0].modelVersion, 1);
      assert.deepEqual(deployedVersions, [1, 1]);
      const denials = captured.lines.filter((line) =>
        /denied|rejected/.test(String(line.msg)),
      );
      assert.deepEqual(denials, []);
      const methods = captured.lines
        .filter((line) => line.msg === 'client authenticated')
        .map((line) => line.method);
      assert.ok(methods.length >= 3);
      assert.ok(methods.every((method) => method === 'certificate'));
    },
  );
});
