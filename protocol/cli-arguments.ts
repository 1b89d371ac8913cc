import { InvalidArgumentError, Option, type Command } from 'commander';
import { isFleetError } from './errors.ts';
import type { Logger } from './logger.ts';
import {
  loadClientTls,
  type BrokerClientSecurity,
  type ClientTlsFiles,
} from './tls.ts';

/**
 * Parsers of numeric command-line values for commander. Each throws
 * InvalidArgumentError, which commander prints with the option name.
 * `reportStartError` reports what stops a command at start.
 */

function toNumber(text: string): number {
  return text.trim() === '' ? Number.NaN : Number(text);
}

/** Returns a parser of integers >= `min`. */
export function parseIntegerAtLeast(min: number): (text: string) => number {
  return (text) => {
    const value = toNumber(text);
    if (!Number.isSafeInteger(value) || value < min) {
      throw new InvalidArgumentError(
        `expected an integer >= ${min}, got ${text}`,
      );
    }
    return value;
  };
}

/** Returns a parser of finite numbers >= `min`. */
export function parseNumberAtLeast(min: number): (text: string) => number {
  return (text) => {
    const value = toNumber(text);
    if (!Number.isFinite(value) || value < min) {
      throw new InvalidArgumentError(
        `expected a number >= ${min}, got ${text}`,
      );
    }
    return value;
  };
}

/** Parses a finite number > 0. */
export function parsePositiveNumber(text: string): number {
  const value = toNumber(text);
  if (!Number.isFinite(value) || value <= 0) {
    throw new InvalidArgumentError(`expected a positive number, got ${text}`);
  }
  return value;
}

/** Parses a number strictly between 0 and 1. */
export function parseFraction(text: string): number {
  const value = toNumber(text);
  if (!(value > 0 && value < 1)) {
    throw new InvalidArgumentError(`expected a number in (0, 1), got ${text}`);
  }
  return value;
}

/**
 * Reports an error that stops a command at start, and returns the exit
 * code. A FleetError or a bad argument (RangeError, TypeError, or
 * commander's InvalidArgumentError from a check across flags) is a user
 * error: one plain line on stderr, a fatal log line with its code and
 * message, and exit code 2. Anything else is logged with its stack, and
 * the exit code is 1.
 */
export function reportStartError(
  command: string,
  err: unknown,
  log: Logger,
  message: string,
): number {
  const isUserError =
    isFleetError(err) ||
    err instanceof RangeError ||
    err instanceof TypeError ||
    err instanceof InvalidArgumentError;
  if (!isUserError) {
    log.fatal({ err }, message);
    return 1;
  }
  const code = isFleetError(err) ? err.code : err.name;
  log.fatal({ code, reason: err.message }, message);
  console.error(`${command}: ${err.message}`);
  return 2;
}

/**
 * Adds the four DP-FedAvg flags, shared by the aggregator and the
 * simulator. Both read them with `differentialPrivacyOfFlags`.
 */
export function addDifferentialPrivacyOptions(command: Command): Command {
  return command
    .option(
      '--dp-clip-norm <number>',
      'DP-FedAvg: clip each update to this L2 norm (all four --dp-* or none)',
      parseNumberAtLeast(0),
    )
    .option(
      '--dp-noise-multiplier <number>',
      'DP-FedAvg: noise standard deviation over the clip norm (z)',
      parseNumberAtLeast(0),
    )
    .option(
      '--dp-target-epsilon <number>',
      'DP-FedAvg: stop before epsilon would exceed this',
      parseNumberAtLeast(0),
    )
    .option(
      '--dp-delta <number>',
      'DP-FedAvg: delta of the (epsilon, delta) guarantee',
      parseNumberAtLeast(0),
    );
}

/**
 * Adds the secure aggregation options, shared by the aggregator and the
 * simulator; `secureAggregationOfFlags` turns them into options.
 */
export function addSecureAggregationOptions(command: Command): Command {
  return command
    .option(
      '--secure-aggregation',
      'mask updates so that the aggregator sees only the round sum',
    )
    .option(
      '--secagg-clip-norm <number>',
      'secure aggregation: L2 norm vehicles clip to before masking ' +
        '(default 10; with DP, --dp-clip-norm)',
      parsePositiveNumber,
    )
    .option(
      '--secagg-threshold-fraction <number>',
      'secure aggregation: Shamir threshold as a share of the vehicles ' +
        '(default 0.5: a majority must stay)',
      parseFraction,
    )
    .option(
      '--secagg-phase-timeout-ms <ms>',
      'secure aggregation: wait for the key, share and unmask phases ' +
        '(default 30000)',
      parseIntegerAtLeast(1),
    );
}

/**
 * Adds the server optimizer flags, shared by the aggregator and the
 * simulator; the aggregator's `serverOptimizerOfFlags` reads them.
 * `names` are the optimizers the aggregator implements.
 */
export function addServerOptimizerOptions(
  command: Command,
  names: readonly string[],
): Command {
  return command
    .addOption(
      new Option(
        '--server-optimizer <name>',
        "server optimizer applied to each round's mean delta (default: " +
          'none, the mean delta is added as it is)',
      ).choices([...names]),
    )
    .option(
      '--server-lr <number>',
      'server learning rate (default 1 for fedavgm, 0.01 for the others)',
      parsePositiveNumber,
    )
    .option(
      '--server-momentum <number>',
      'fedavgm: momentum in [0, 1) (default 0.9)',
      parseNumberAtLeast(0),
    )
    .option(
      '--server-beta1 <number>',
      'fedadagrad, fedadam, fedyogi: decay of the first moment, in [0, 1) ' +
        '(default 0.9)',
      parseNumberAtLeast(0),
    )
    .option(
      '--server-beta2 <number>',
      'fedadam, fedyogi: decay of the second moment, in [0, 1) (default 0.99)',
      parseNumberAtLeast(0),
    )
    .option(
      '--server-tau <number>',
      'fedadagrad, fedadam, fedyogi: adaptivity tau > 0; larger adapts ' +
        'less (default 0.001)',
      parsePositiveNumber,
    );
}

/**
 * Adds the norm bound flags, shared by the aggregator and the simulator;
 * the aggregator's `normBoundOfFlags` reads them.
 */
export function addNormBoundOptions(command: Command): Command {
  return command
    .option(
      '--norm-bound-multiple <number>',
      "bound each update's L2 norm to this multiple of the round's median " +
        'update norm',
      parsePositiveNumber,
    )
    .option(
      '--norm-bound-max <number>',
      "bound each update's L2 norm to this value; with " +
        '--norm-bound-multiple the smaller bound applies',
      parseNumberAtLeast(0),
    )
    .addOption(
      new Option(
        '--norm-bound-action <action>',
        'clip: scale an update above the bound down to it; reject: leave ' +
          'it out of the round (default clip)',
      ).choices(['clip', 'reject']),
    );
}

/** Flags of addSecureAggregationOptions, as commander parses them. */
export interface SecureAggregationFlags {
  secureAggregation?: boolean;
  secaggClipNorm?: number;
  secaggThresholdFraction?: number;
  secaggPhaseTimeoutMs?: number;
}

/**
 * Returns the aggregator's secureAggregation option from the flags; undefined
 * without --secure-aggregation.
 *
 * @throws {InvalidArgumentError} for a --secagg-* flag without
 *   --secure-aggregation.
 */
export function secureAggregationOfFlags(flags: SecureAggregationFlags):
  | {
      clipNorm?: number;
      thresholdFraction?: number;
      phaseTimeoutMs?: number;
    }
  | undefined {
  const detail = {
    clipNorm: flags.secaggClipNorm,
    thresholdFraction: flags.secaggThresholdFraction,
    phaseTimeoutMs: flags.secaggPhaseTimeoutMs,
  };
  if (flags.secureAggregation !== true) {
    if (Object.values(detail).some((value) => value !== undefined)) {
      throw new InvalidArgumentError(
        '--secagg-* options need --secure-aggregation',
      );
    }
    return undefined;
  }
  return detail;
}

/**
 * Adds the asynchronous mode (FedBuff) options, shared by the aggregator
 * and the simulator; `asyncBufferOfFlags` turns them into options.
 */
export function addAsyncBufferOptions(command: Command): Command {
  return command
    .option(
      '--async-buffer-size <count>',
      'asynchronous mode (FedBuff): step the model after every <count> ' +
        'accepted updates, taking stale ones weighted down',
      parseIntegerAtLeast(1),
    )
    .option(
      '--max-staleness <versions>',
      'asynchronous mode: oldest model version lag an update may have ' +
        '(default 4)',
      parseIntegerAtLeast(0),
    )
    .option(
      '--staleness-exponent <number>',
      'asynchronous mode: weight updates by (1 + lag)^-exponent ' +
        '(default 0.5)',
      parseNumberAtLeast(0),
    );
}

/** Flags of addAsyncBufferOptions, as commander parses them. */
export interface AsyncBufferFlags {
  asyncBufferSize?: number;
  maxStaleness?: number;
  stalenessExponent?: number;
}

/**
 * Returns the aggregator's asyncBuffer option from the flags; undefined without
 * --async-buffer-size.
 *
 * @throws {InvalidArgumentError} for --max-staleness or
 *   --staleness-exponent without --async-buffer-size.
 */
export function asyncBufferOfFlags(
  flags: AsyncBufferFlags,
):
  | { bufferSize: number; maxStaleness?: number; stalenessExponent?: number }
  | undefined {
  if (flags.asyncBufferSize === undefined) {
    if (
      flags.maxStaleness !== undefined ||
      flags.stalenessExponent !== undefined
    ) {
      throw new InvalidArgumentError(
        '--max-staleness and --staleness-exponent need --async-buffer-size',
      );
    }
    return undefined;
  }
  return {
    bufferSize: flags.asyncBufferSize,
    maxStaleness: flags.maxStaleness,
    stalenessExponent: flags.stalenessExponent,
  };
}

/** The broker credential flags of a client command. */
export interface BrokerClientFlags {
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  username?: string;
}

/**
 * Returns the broker credentials from the flags: the three --tls-* files,
 * else `configTls` (from a --config file), and --username with the
 * password from $FLEETLEARN_BROKER_PASSWORD. Undefined when none is set.
 *
 * @throws {TypeError} when only some of the --tls-* flags are given.
 */
export function brokerSecurityOfFlags(
  flags: BrokerClientFlags,
  configTls?: ClientTlsFiles,
): BrokerClientSecurity | undefined {
  const tlsFlags = [flags.tlsCa, flags.tlsCert, flags.tlsKey];
  const tlsFlagCount = tlsFlags.filter((flag) => flag !== undefined).length;
  if (tlsFlagCount !== 0 && tlsFlagCount !== 3) {
    throw new TypeError('give all of --tls-ca, --tls-cert and --tls-key');
  }
  const files =
    tlsFlagCount === 3
      ? {
          caPath: flags.tlsCa!,
          certPath: flags.tlsCert!,
          keyPath: flags.tlsKey!,
        }
      : configTls;
  const security: BrokerClientSecurity = {};
  if (files !== undefined) security.tls = loadClientTls(files);
  if (flags.username !== undefined) {
    security.username = flags.username;
    security.password = process.env.FLEETLEARN_BROKER_PASSWORD;
  }
  return Object.keys(security).length === 0 ? undefined : security;
}
