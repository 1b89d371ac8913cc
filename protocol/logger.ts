import { pino, type Logger } from 'pino';

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
