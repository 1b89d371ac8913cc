/**
 * Command line of the MQTT broker:
 * `npx tsx broker/main.ts --port 1883 --host 127.0.0.1` for development,
 * `npx tsx broker/main.ts --pki-dir state/pki` for mutual TLS with the
 * files that `npm run provision` wrote. SIGHUP reloads the TLS files, the
 * CRL and the users file. Processes started with the same
 * `--redis-url redis://127.0.0.1:6379` and their own ports are nodes of
 * one broker.
 */
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import {
  createLogger,
  defaultLogLevel,
  type FleetRole,
} from '../protocol/index.ts';
import {
  parseIntegerAtLeast,
  parsePositiveNumber,
} from '../protocol/cli-arguments.ts';
import { startBroker, type BrokerOptions } from './broker.ts';
import type { BrokerTlsOptions } from './listener.ts';
import type { ClientLimits } from './rate-limit.ts';

function parsePort(text: string): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value < 0 || value > 65535) {
    throw new InvalidArgumentError(`expected a port in 0-65535, got ${text}`);
  }
  return value;
}

const program = new Command('broker')
  .description(
    'Run the fleetlearn MQTT 3.1.1 broker (aedes) on TCP, or on TLS with ' +
      'client certificates.',
  )
  .option(
    '--port <port>',
    'port, 0 for any free port (default 8883 with TLS, else 1883)',
    parsePort,
  )
  .option('--host <address>', 'interface to listen on', '127.0.0.1')
  .option(
    '--pki-dir <folder>',
    'use the provisioning folder: broker/broker.{cert,key}.pem, ' +
      'ca/ca.cert.pem and ca/crl.pem',
  )
  .option('--tls-cert <file>', 'broker certificate (PEM); enables TLS')
  .option('--tls-key <file>', 'broker private key (PEM)')
  .option('--tls-ca <file>', 'CA that signs client certificates (PEM)')
  .option('--tls-crl <file>', 'CRL of that CA (PEM)')
  .option(
    '--allow-password-clients',
    'with --tls-ca, let clients without a certificate log in with a ' +
      'username and password from --users',
  )
  .option('--users <file>', 'users file of username and password identities')
  .option(
    '--max-message-bytes <bytes>',
    'largest PUBLISH payload per client, in bytes (default 64 MiB)',
    parseIntegerAtLeast(1),
  )
  .option(
    '--vehicle-publish-rate <count>',
    'sustained publishes per second of one vehicle (default 10)',
    parsePositiveNumber,
  )
  .option(
    '--vehicle-publish-burst <count>',
    'publishes one vehicle may send in a burst (default 100)',
    parseIntegerAtLeast(1),
  )
  .option(
    '--aggregator-publish-rate <count>',
    'sustained publishes per second of the aggregator (default 1000)',
    parsePositiveNumber,
  )
  .option(
    '--aggregator-publish-burst <count>',
    'publishes the aggregator may send in a burst (default 10000)',
    parseIntegerAtLeast(1),
  )
  .option(
    '--redis-url <url>',
    'share messages, retained messages, subscriptions and sessions with ' +
      'the other broker nodes on this Redis, e.g. redis://127.0.0.1:6379',
  )
  .addOption(
    new Option('--log-level <level>', 'pino log level')
      .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default(defaultLogLevel()),
  );

interface Flags {
  port?: number;
  host: string;
  pkiDir?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsCrl?: string;
  allowPasswordClients?: boolean;
  users?: string;
  maxMessageBytes?: number;
  vehiclePublishRate?: number;
  vehiclePublishBurst?: number;
  aggregatorPublishRate?: number;
  aggregatorPublishBurst?: number;
  redisUrl?: string;
  logLevel: string;
}

/** TLS options from --pki-dir, overridden by the single --tls-* flags. */
function tlsOptionsOf(flags: Flags): BrokerTlsOptions | undefined {
  const pki = flags.pkiDir;
  const fromPki = (...parts: string[]): string | undefined =>
    pki === undefined ? undefined : path.join(pki, ...parts);
  const certPath = flags.tlsCert ?? fromPki('broker', 'broker.cert.pem');
  const keyPath = flags.tlsKey ?? fromPki('broker', 'broker.key.pem');
  if (certPath === undefined && keyPath === undefined) return undefined;
  if (certPath === undefined || keyPath === undefined) {
    return program.error('error: --tls-cert and --tls-key go together');
  }
  const caPath = flags.tlsCa ?? fromPki('ca', 'ca.cert.pem');
  return {
    certPath,
    keyPath,
    caPath,
    crlPath: flags.tlsCrl ?? fromPki('ca', 'crl.pem'),
    requireClientCertificate:
      caPath !== undefined && flags.allowPasswordClients !== true,
  };
}

function limitsOf(flags: Flags): BrokerOptions['limits'] {
  const role = (
    rate: number | undefined,
    burst: number | undefined,
  ): Partial<ClientLimits> => {
    const limits: Partial<ClientLimits> = {};
    if (flags.maxMessageBytes !== undefined) {
      limits.maxMessageBytes = flags.maxMessageBytes;
    }
    if (rate !== undefined) limits.publishesPerSecond = rate;
    if (burst !== undefined) limits.publishBurst = burst;
    return limits;
  };
  const limits: Partial<Record<FleetRole, Partial<ClientLimits>>> = {
    vehicle: role(flags.vehiclePublishRate, flags.vehiclePublishBurst),
    aggregator: role(flags.aggregatorPublishRate, flags.aggregatorPublishBurst),
  };
  return limits;
}

program.parse();
const flags = program.opts<Flags>();
const log = createLogger({ level: flags.logLevel });
const tls = tlsOptionsOf(flags);
const port = flags.port ?? (tls === undefined ? 1883 : 8883);

try {
  const broker = await startBroker({
    port,
    host: flags.host,
    log,
    tls,
    usersPath: flags.users,
    limits: limitsOf(flags),
    redisUrl: flags.redisUrl,
  });
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'shutting down');
    broker.close().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err }, 'broker shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGHUP', () => {
    try {
      broker.reloadCredentials();
    } catch (err) {
      log.error({ err }, 'credentials reload failed, previous files in force');
    }
  });
} catch (err) {
  log.fatal({ err, host: flags.host, port }, 'broker failed to start');
  process.exitCode = 1;
}
