/**
 * Shared pieces of the TLS and ACL tests: a fleet PKI made with the
 * provisioning code in a temporary folder, a second CA that the broker does
 * not trust, log capture and MQTT connection attempts with their outcome.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { pino } from 'pino';
import type { BrokerTlsOptions } from '../broker/index.ts';
import {
  loadClientTls,
  toMqttSecurityOptions,
  type ClientTlsMaterial,
  type Logger,
} from '../protocol/index.ts';
import {
  authorityPaths,
  initAuthority,
  issueAggregator,
  issueBroker,
  issueVehicle,
  type FleetAuthority,
  type IssuedFiles,
} from '../scripts/provision/index.ts';

/** A fleet CA with a broker, an aggregator and vehicles, plus a stranger. */
export interface TestPki {
  dir: string;
  fleetId: string;
  authority: FleetAuthority;
  broker: IssuedFiles;
  aggregator: IssuedFiles;
  vehicles: Map<string, IssuedFiles>;
  /** A vehicle certificate of the same fleet id from another CA. */
  foreignVehicle: IssuedFiles;
  /** The other CA's certificate. */
  foreignCaPath: string;
  remove(): void;
}

/** Creates the PKI; brokerUrl only goes into the client configurations. */
export async function createTestPki(
  fleetId: string,
  vehicleIds: string[],
): Promise<TestPki> {
  const dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-pki-'));
  const brokerUrl = 'mqtts://127.0.0.1:8883';
  const authority = await initAuthority(path.join(dir, 'fleet'), { fleetId });
  const broker = await issueBroker(authority, {
    hosts: ['127.0.0.1', 'localhost'],
  });
  const aggregator = await issueAggregator(authority, { brokerUrl });
  const vehicles = new Map<string, IssuedFiles>();
  for (const vehicleId of vehicleIds) {
    vehicles.set(
      vehicleId,
      await issueVehicle(authority, { vehicleId, brokerUrl }),
    );
  }
  const stranger = await initAuthority(path.join(dir, 'stranger'), {
    fleetId,
  });
  const foreignVehicle = await issueVehicle(stranger, {
    vehicleId: vehicleIds[0],
    brokerUrl,
  });
  return {
    dir,
    fleetId,
    authority,
    broker,
    aggregator,
    vehicles,
    foreignVehicle,
    foreignCaPath: authorityPaths(stranger.dir).certificate,
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** Broker TLS options of the PKI: mutual TLS with its CRL. */
export function brokerTlsOf(
  pki: TestPki,
  overrides: Partial<BrokerTlsOptions> = {},
): BrokerTlsOptions {
  const paths = authorityPaths(pki.authority.dir);
  return {
    certPath: pki.broker.certificatePath,
    keyPath: pki.broker.privateKeyPath,
    caPath: paths.certificate,
    crlPath: paths.crl,
    ...overrides,
  };
}

/** Client TLS material of issued files. */
export function clientTlsOf(files: IssuedFiles): ClientTlsMaterial {
  return loadClientTls({
    caPath: files.caPath,
    certPath: files.certificatePath,
    keyPath: files.privateKeyPath,
  });
}

/** mqtt.js options that present `files` as the client certificate. */
export function tlsClientOptions(files: IssuedFiles): IClientOptions {
  return toMqttSecurityOptions({ tls: clientTlsOf(files) });
}

/** A pino logger that keeps every line, with a wait for a message. */
export interface CapturedLog {
  log: Logger;
  lines: Record<string, unknown>[];
  /** Resolves with the first line whose `msg` is `message` and that passes `where`. */
  waitFor(
    message: string,
    where?: (line: Record<string, unknown>) => boolean,
    timeoutMs?: number,
  ): Promise<Record<string, unknown>>;
}

export function captureLog(): CapturedLog {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      lines.push(JSON.parse(String(chunk)));
      done();
    },
  });
  const waitFor: CapturedLog['waitFor'] = async (
    message,
    where = () => true,
    timeoutMs = 5000,
  ) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const line = lines.find((entry) => entry.msg === message && where(entry));
      if (line !== undefined) return line;
      if (Date.now() > deadline) {
        throw new Error(
          `no log line "${message}" within ${timeoutMs} ms; got: ` +
            lines.map((entry) => entry.msg).join(' | '),
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  return { log: pino({ level: 'debug' }, stream), lines, waitFor };
}

/** Result of one connection attempt. */
export interface ConnectOutcome {
  client: MqttClient;
  connected: boolean;
  /** First error mqtt.js emitted; `code` is the CONNACK return code. */
  error?: Error & { code?: number | string };
}

/**
 * Connects once (no reconnects) and resolves on CONNACK success, or on
 * the connection's close with the first error seen.
 */
export function tryConnect(
  url: string,
  options: IClientOptions,
): Promise<ConnectOutcome> {
  const client = mqtt.connect(url, {
    protocolVersion: 4,
    reconnectPeriod: 0,
    connectTimeout: 5000,
    ...options,
  });
  return new Promise((resolve) => {
    let error: ConnectOutcome['error'];
    client.on('error', (err) => (error ??= err));
    client.once('connect', () => resolve({ client, connected: true }));
    client.once('close', () => resolve({ client, connected: false, error }));
  });
}

/** Resolves when `client` closes, or rejects after `timeoutMs`. */
export function waitForClose(
  client: MqttClient,
  timeoutMs = 5000,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`client not closed within ${timeoutMs} ms`)),
      timeoutMs,
    );
    client.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** Waits `ms` milliseconds. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
