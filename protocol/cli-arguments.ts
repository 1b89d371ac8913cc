import { InvalidArgumentError, type Command } from 'commander';
import { isFleetError } from './errors.ts';
import type { Logger } from './logger.ts';

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
 * code. A FleetError or a bad argument (RangeError, TypeError) is a user
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
    isFleetError(err) || err instanceof RangeError || err instanceof TypeError;
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
