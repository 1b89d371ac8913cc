import { pino, type Logger } from 'pino';

import { isFleetError } from './errors.ts';

export type { Logger };

/**
 * Creates the root pino logger of a process. Components take a child with
 * a `component` binding. The level comes from `level`, then the
 * FLEETLEARN_LOG_LEVEL environment variable, then "info".
 */
export function createLogger(
  options: { level?: string; name?: string } = {},
): Logger {
  return pino({
    name: options.name ?? 'fleetlearn',
    level: options.level ?? process.env.FLEETLEARN_LOG_LEVEL ?? 'info',
  });
}

/** Log levels the command lines accept. */
export const LOG_LEVEL_NAMES = [
  'fatal',
  'error',
  'warn',
  'info',
  'debug',
  'trace',
  'silent',
] as const;

/**
 * Returns FLEETLEARN_LOG_LEVEL when it names a level, else "info", as the
 * default of the --log-level flags. An unknown value is reported on stderr
 * once, because no logger exists yet.
 */
export function defaultLogLevel(): string {
  const fromEnv = process.env.FLEETLEARN_LOG_LEVEL;
  if (fromEnv === undefined || fromEnv === '') return 'info';
  if ((LOG_LEVEL_NAMES as readonly string[]).includes(fromEnv)) return fromEnv;
  console.error(
    `FLEETLEARN_LOG_LEVEL=${fromEnv} is not a log level, expected one of ` +
      `${LOG_LEVEL_NAMES.join(', ')}; using info`,
  );
  return 'info';
}

/**
 * Returns the log fields of a caught error: code and message for a
 * FleetError, which is bad input whose stack is of no use, and the error
 * with its stack for anything else, which is a bug.
 */
export function errorLogFields(err: unknown): Record<string, unknown> {
  return isFleetError(err) ? { code: err.code, reason: err.message } : { err };
}
