/**
 * Flags of `npm run rollout`: the broker connection (as the aggregator
 * takes them), the release key, and the gate thresholds.
 */
import path from 'node:path';
import { InvalidArgumentError, type Command } from 'commander';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  loadSigningKey,
  parseTags,
  assertTopicLevel,
  readClientConfig,
  readSigningConfig,
  type Logger,
} from '../../protocol/index.ts';
import {
  brokerSecurityOfFlags,
  parseIntegerAtLeast,
  parseNumberAtLeast,
} from '../../protocol/cli-arguments.ts';
import type { RolloutControllerOptions } from './controller.ts';
import { DEFAULT_GATES, checkGates, type GateThresholds } from './gates.ts';

/** Flags shared by every subcommand. */
export interface GlobalFlags {
  stateDir: string;
  rolloutDir?: string;
  config?: string;
  fleetId: string;
  brokerUrl: string;
  clientId?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  username?: string;
  releaseSigningKey?: string;
  maxMessageBytes: number;
  logLevel: string;
}

/** Parses a number from 0 to 1 for a commander flag. */
export function parseShare(text: string): number {
  const value = Number(text);
  if (text.trim() === '' || !(value >= 0 && value <= 1)) {
    throw new InvalidArgumentError(
      `expected a number from 0 to 1, got ${text}`,
    );
  }
  return value;
}

/** Parses `a,b` lists of vehicle ids. */
export function parseList(text: string): string[] {
  const items = text.split(',').map((item) => item.trim());
  if (items.some((item) => item.length === 0)) {
    throw new InvalidArgumentError(
      `expected a comma-separated list without empty entries, got "${text}"`,
    );
  }
  for (const item of items) {
    try {
      assertTopicLevel('vehicle id', item);
    } catch (err) {
      throw new InvalidArgumentError((err as Error).message);
    }
  }
  return items;
}

/** Parses `region=eu,type=van` into tags. */
export function parseTagList(text: string): Record<string, string> {
  try {
    return parseTags(text.split(','));
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** Adds the connection and signing flags to the root command. */
export function addGlobalOptions(program: Command): Command {
  return program
    .requiredOption(
      '--state-dir <dir>',
      "state directory with the model store (the aggregator's)",
    )
    .option(
      '--rollout-dir <dir>',
      'directory of rollout.json; default <state-dir>/rollout',
    )
    .option(
      '--config <file>',
      'aggregator.json from provisioning (broker, TLS, release key)',
    )
    .option('--fleet-id <id>', 'fleet id', 'default')
    .option('--broker-url <url>', 'broker URL', 'mqtt://127.0.0.1:1883')
    .option(
      '--client-id <id>',
      'MQTT client id; default aggregator-<fleet>-rollout, which the broker ' +
        'accepts with the aggregator certificate',
    )
    .option('--tls-ca <file>', 'fleet CA certificate (PEM)')
    .option('--tls-cert <file>', 'client certificate (PEM)')
    .option('--tls-key <file>', 'client private key (PEM, mode 0600)')
    .option(
      '--username <name>',
      'MQTT username; password from FLEETLEARN_BROKER_PASSWORD',
    )
    .option(
      '--release-signing-key <file>',
      'release key that signs the notices',
    )
    .option(
      '--max-message-bytes <bytes>',
      'largest notice or chunk message',
      parseIntegerAtLeast(1024),
      DEFAULT_MAX_MESSAGE_BYTES,
    )
    .option('--log-level <level>', 'pino log level', 'info');
}

/** Adds the gate threshold flags to `command`. */
export function addGateOptions(command: Command): Command {
  const d = DEFAULT_GATES;
  const count = parseIntegerAtLeast(0);
  const ms = parseIntegerAtLeast(0);
  const number = parseNumberAtLeast(0);
  return command
    .option(
      '--min-vehicles <n>',
      'cohort vehicles that must report',
      count,
      d.minVehicles,
    )
    .option(
      '--min-reported-fraction <share>',
      'share of known cohort vehicles that must report',
      parseShare,
      d.minReportedFraction,
    )
    .option(
      '--min-inferences <n>',
      'inferences a vehicle report must cover',
      count,
      d.minInferences,
    )
    .option(
      '--min-accuracy <share>',
      'lowest candidate accuracy',
      parseShare,
      d.minAccuracy,
    )
    .option(
      '--max-accuracy-drop <share>',
      'largest accuracy loss against the stable version',
      parseShare,
      d.maxAccuracyDrop,
    )
    .option(
      '--no-require-accuracy',
      'pass stages whose vehicles report no labelled frames',
    )
    .option(
      '--max-p50-ms <ms>',
      'largest per-vehicle p50 latency',
      number,
      d.maxP50Ms,
    )
    .option(
      '--max-p95-ms <ms>',
      'largest per-vehicle p95 latency',
      number,
      d.maxP95Ms,
    )
    .option(
      '--max-error-rate <share>',
      'largest share of failed inferences',
      parseShare,
      d.maxErrorRate,
    )
    .option(
      '--min-confidence <share>',
      'lowest mean top-1 confidence',
      parseShare,
      d.minConfidence,
    )
    .option(
      '--max-confidence-drop <share>',
      'largest confidence loss against the stable version',
      parseShare,
      d.maxConfidenceDrop,
    )
    .option(
      '--min-agreement <share>',
      'shadow stages: lowest top-1 agreement',
      parseShare,
      d.minAgreement,
    )
    .option(
      '--min-stage-ms <ms>',
      'time a stage runs before promotion',
      ms,
      d.minStageMs,
    )
    .option(
      '--stage-timeout-ms <ms>',
      'time after which a stage without enough reports rolls back',
      ms,
      d.stageTimeoutMs,
    );
}

/** Gate thresholds from the flags of `addGateOptions`. */
export function gatesOf(flags: Record<string, unknown>): GateThresholds {
  const gates = {} as Record<string, unknown>;
  for (const name of Object.keys(DEFAULT_GATES)) gates[name] = flags[name];
  return checkGates(gates as unknown as GateThresholds);
}

/**
 * Controller options from the global flags; the --config file fills in
 * what the flags leave out.
 */
export function controllerOptionsOf(
  flags: GlobalFlags,
  log: Logger,
): RolloutControllerOptions {
  const config =
    flags.config === undefined ? undefined : readClientConfig(flags.config);
  const signing =
    flags.config === undefined ? {} : readSigningConfig(flags.config);
  const keyPath = flags.releaseSigningKey ?? signing.releaseSigningKeyPath;
  return {
    fleetId: config?.fleetId ?? flags.fleetId,
    brokerUrl: config?.brokerUrl ?? flags.brokerUrl,
    security: brokerSecurityOfFlags(flags, config?.tls),
    clientId: flags.clientId,
    modelStateDir: flags.stateDir,
    rolloutDir: flags.rolloutDir ?? path.join(flags.stateDir, 'rollout'),
    signingKey: keyPath === undefined ? undefined : loadSigningKey(keyPath),
    maxMessageBytes: flags.maxMessageBytes,
    log,
  };
}
