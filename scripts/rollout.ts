/**
 * Staged rollouts: `npm run rollout -- --state-dir DIR <command>`.
 * `start VERSION` releases a stored version to a cohort and, unless
 * --no-watch, keeps evaluating the gates until it is promoted to the
 * whole fleet or rolled back. `watch` resumes that loop after a restart;
 * `promote`, `rollback` and `pin VERSION` act at once; `status` prints
 * the state file. Run with --help for the flags.
 */
import { Command } from 'commander';
import { createLogger, isFleetError } from '../protocol/index.ts';
import { parseIntegerAtLeast } from '../protocol/cli-arguments.ts';
import { RolloutController, type StartRequest } from './rollout/controller.ts';
import {
  addGateOptions,
  addGlobalOptions,
  controllerOptionsOf,
  gatesOf,
  parseList,
  parseTagList,
  type GlobalFlags,
} from './rollout/cli-options.ts';
import { parseStages, readState } from './rollout/state.ts';

const parseVersion = parseIntegerAtLeast(0);
const DEFAULT_INTERVAL_MS = 5000;

interface StartFlags extends Record<string, unknown> {
  stages: string;
  cohortTags?: Record<string, string>;
  vehicles?: string[];
  shadow?: boolean;
  salt?: string;
  watch: boolean;
  intervalMs: number;
}

/**
 * Connects a controller, runs `action` and disconnects. SIGINT and
 * SIGTERM abort a watch loop; the state file keeps the stage.
 */
async function withController(
  command: Command,
  action: (controller: RolloutController, signal: AbortSignal) => Promise<void>,
): Promise<void> {
  const flags = command.optsWithGlobals<GlobalFlags>();
  const log = createLogger({ level: flags.logLevel, name: 'rollout' });
  const options = controllerOptionsOf(flags, log);
  if (options.signingKey === undefined) {
    // Vehicles with trusted release keys ignore unsigned notices, so the
    // rollout would change nothing on them while its state records it.
    const warning =
      'no --release-signing-key: notices go out unsigned, and vehicles ' +
      'with trusted release keys ignore them';
    log.warn({ fleetId: options.fleetId }, warning);
    console.error(`rollout: warning: ${warning}`);
  }
  const controller = new RolloutController(options);
  const abort = new AbortController();
  const stop = (): void => abort.abort();
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    await controller.connect();
    await action(controller, abort.signal);
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    await controller.close();
  }
}

function printState(controller: RolloutController): void {
  console.log(JSON.stringify(controller.current ?? null, null, 2));
}

const program = new Command('rollout').description(
  'Staged rollout of stored model versions to cohorts of the fleet.',
);
addGlobalOptions(program);

addGateOptions(
  program
    .command('start')
    .description(
      "release VERSION to the first stage's cohort, then watch the gates",
    )
    .argument('<version>', 'stored model version', parseVersion)
    .option('--stages <percents>', 'cohort percent of each stage', '10,50,100')
    .option(
      '--cohort-tags <tags>',
      'only vehicles with these tags, e.g. region=eu,type=van',
      parseTagList,
    )
    .option(
      '--vehicles <ids>',
      "vehicles in every stage's cohort, e.g. veh-001,veh-002",
      parseList,
    )
    .option('--shadow', 'run the first stage in shadow mode')
    .option('--salt <text>', 'cohort hash salt; default random')
    .option('--no-watch', 'publish the first stage and exit')
    .option(
      '--interval-ms <ms>',
      'time between gate evaluations',
      parseIntegerAtLeast(10),
      DEFAULT_INTERVAL_MS,
    ),
).action(async (version: number, flags: StartFlags, command: Command) => {
  const request: StartRequest = {
    version,
    stages: parseStages(flags.stages, flags.shadow === true),
    cohortTags: flags.cohortTags ?? {},
    vehicleIds: flags.vehicles ?? [],
    gates: gatesOf(flags),
    hashSalt: flags.salt,
  };
  await withController(command, async (controller, signal) => {
    await controller.start(request);
    if (flags.watch) await controller.watch(flags.intervalMs, signal);
    printState(controller);
  });
});

program
  .command('watch')
  .description(
    'resume the active rollout: publish its stage again and watch the gates',
  )
  .option(
    '--interval-ms <ms>',
    'time between gate evaluations',
    parseIntegerAtLeast(10),
    DEFAULT_INTERVAL_MS,
  )
  .action(async (flags: { intervalMs: number }, command: Command) => {
    await withController(command, async (controller, signal) => {
      await controller.resume();
      await controller.watch(flags.intervalMs, signal);
      printState(controller);
    });
  });

program
  .command('promote')
  .description(
    'move to the next stage now, or after the last one to the whole fleet',
  )
  .option('--reason <text>', 'recorded in the history', 'manual')
  .action(async (flags: { reason: string }, command: Command) => {
    await withController(command, async (controller) => {
      await controller.promote(flags.reason);
      printState(controller);
    });
  });

program
  .command('rollback')
  .description(
    'withdraw the candidate; cohort vehicles return to the stable version',
  )
  .option('--reason <text>', 'recorded in the history', 'manual')
  .action(async (flags: { reason: string }, command: Command) => {
    await withController(command, async (controller) => {
      await controller.rollback(flags.reason);
      printState(controller);
    });
  });

program
  .command('pin')
  .description(
    'publish VERSION to the whole fleet now, ending an active rollout',
  )
  .argument('<version>', 'stored model version', parseVersion)
  .option('--reason <text>', 'recorded in the history', 'manual')
  .action(
    async (version: number, flags: { reason: string }, command: Command) => {
      await withController(command, async (controller) => {
        await controller.pin(version, flags.reason);
        printState(controller);
      });
    },
  );

program
  .command('status')
  .description('print the rollout state file')
  .action((_flags: unknown, command: Command) => {
    const flags = command.optsWithGlobals<GlobalFlags>();
    const dir = flags.rolloutDir ?? `${flags.stateDir}/rollout`;
    console.log(JSON.stringify(readState(dir) ?? null, null, 2));
  });

program.parseAsync().catch((err: unknown) => {
  const isUserError =
    isFleetError(err) || err instanceof RangeError || err instanceof TypeError;
  if (!isUserError) throw err;
  console.error(`error: ${(err as Error).message}`);
  process.exitCode = 1;
});
