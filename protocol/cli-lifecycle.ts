/**
 * Start and stop of a long-running command such as the aggregator or the
 * depot: one stop on SIGINT or SIGTERM, and an exit code on a failed start.
 */
import { reportStartError } from './cli-arguments.ts';
import type { Logger } from './logger.ts';

/** A service that a command runs until a signal stops it. */
export interface CommandService {
  start(): Promise<void>;
  stop(): Promise<void>;
}

/** Stop of a running command, shared by its signal handlers and its code. */
export interface CommandShutdown {
  /**
   * Stops the service once and logs `reason`. Later calls wait for that stop.
   */
  stop(reason: string): Promise<void>;
  /** True once `stop` was called, by a signal or by the command. */
  readonly isStopping: boolean;
}

/**
 * Stops `service` on the first SIGINT or SIGTERM, then exits with code 0,
 * or 1 when the stop fails. A second signal waits for the same stop.
 */
export function stopOnSignals(
  service: CommandService,
  log: Logger,
): CommandShutdown {
  let stopping: Promise<void> | undefined;
  const stop = (reason: string): Promise<void> => {
    stopping ??= (async () => {
      log.info({ reason }, 'shutting down');
      await service.stop();
    })();
    return stopping;
  };

  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      stop(signal).then(
        () => process.exit(0),
        (err: unknown) => {
          log.error({ err, signal }, 'stop failed');
          process.exit(1);
        },
      );
    });
  }

  return {
    stop,
    get isStopping() {
      return stopping !== undefined;
    },
  };
}

/**
 * Starts `service` and returns true once it runs. When the start fails,
 * reports the error as `<command> failed to start`, stops the service and
 * exits with the code of `reportStartError`. Returns false when a signal
 * aborted the start, because that signal's handler exits with 0.
 */
export async function startOrExit(
  command: string,
  service: CommandService,
  shutdown: CommandShutdown,
  log: Logger,
): Promise<boolean> {
  try {
    await service.start();
    return true;
  } catch (err) {
    if (shutdown.isStopping) return false;
    const exitCode = reportStartError(
      command,
      err,
      log,
      `${command} failed to start`,
    );
    try {
      await service.stop();
    } catch (stopErr) {
      log.error({ err: stopErr, command }, 'stop after failed start failed');
    }
    process.exit(exitCode);
  }
}
