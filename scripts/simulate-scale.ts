/**
 * Command line of the scale simulation:
 * `npm run simulate-scale -- --vehicles 1000 --rounds 1 --report r.json`.
 * The broker and a heap-capped aggregator run as child processes, and
 * the light vehicles of scripts/sim/light-vehicle.ts in this process.
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, Option } from 'commander';
import {
  ErrorCode,
  FleetError,
  createLogger,
  isFleetError,
} from '../protocol/index.ts';
import { parseIntegerAtLeast } from '../protocol/cli-arguments.ts';
import { resolveDataDir, tensorNamesOfLayers } from '../models/index.ts';
import { runScaleSimulation, type ScaleOptions } from './sim/light-run.ts';
import { printScaleReport, type ScaleReport } from './sim/light-report.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DEFAULT_BASE_WEIGHTS = path.join(
  REPOSITORY_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
/** Publish window per vehicle when --publish-window-ms is not given. */
const WINDOW_MS_PER_VEHICLE = 20;
const MIN_PUBLISH_WINDOW_MS = 2000;

const program = new Command('simulate-scale')
  .description(
    'Run one aggregator with a capped heap and many light vehicles (real ' +
      'MQTT clients that send precomputed updates) on this machine.',
  )
  .option('--vehicles <count>', 'light vehicles', parseIntegerAtLeast(1), 1000)
  .option('--rounds <count>', 'rounds to run', parseIntegerAtLeast(1), 1)
  .option(
    '--seed <integer>',
    'seed of templates, perturbations and delays',
    parseIntegerAtLeast(0),
    1,
  )
  .option(
    '--data <dir>',
    'GTSRB data the templates train on (default: $FLEETLEARN_DATA, then ' +
      'data/gtsrb32-full, data/gtsrb32, ../shared/data/gtsrb32)',
  )
  .option('--base-weights <file>', 'weights of model version 0')
  .option(
    '--train-layers <names>',
    'layers the updates change',
    'dense1,dense2',
  )
  .option(
    '--templates <count>',
    'updates trained for real, which the vehicles send perturbed copies of',
    parseIntegerAtLeast(1),
    4,
  )
  .option(
    '--template-images <count>',
    'training images shared out among the templates',
    parseIntegerAtLeast(1),
    800,
  )
  .option(
    '--publish-window-ms <ms>',
    'each vehicle publishes at a seeded time in this window after the ' +
      `task (default ${WINDOW_MS_PER_VEHICLE} ms per vehicle, at least ` +
      `${MIN_PUBLISH_WINDOW_MS})`,
    parseIntegerAtLeast(0),
  )
  .option(
    '--max-pending-updates <count>',
    'updates published and not yet acked, over all vehicles; 0 for no limit',
    parseIntegerAtLeast(0),
    32,
  )
  .option(
    '--connect-batch <count>',
    'vehicles that connect together',
    parseIntegerAtLeast(1),
    50,
  )
  .option(
    '--connect-interval-ms <ms>',
    'pause between connect batches',
    parseIntegerAtLeast(0),
    250,
  )
  .option(
    '--aggregator-heap-mb <mb>',
    "the aggregator's --max-old-space-size",
    parseIntegerAtLeast(64),
    512,
  )
  .option(
    '--round-timeout-ms <ms>',
    'round deadline',
    parseIntegerAtLeast(1000),
    300_000,
  )
  .option('--fleet-id <id>', 'fleet id (one MQTT topic level)', 'scale')
  .option(
    '--state-dir <dir>',
    "the aggregator's state (default: runs/simulate-scale-<time>)",
  )
  .option('--report <file>', 'write the JSON report to this file')
  .addOption(
    new Option('--log-level <level>', 'pino log level of this process')
      .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default('warn'),
  )
  .option('--no-progress', 'no progress bar (for logs and CI)');

/**
 * Checks the paths and counts that would otherwise fail only after the
 * child processes started.
 *
 * @throws {FleetError} DATA_NOT_FOUND or INVALID_CONFIG naming the value.
 */
function checkInputs(flags: Record<string, unknown>): {
  dataDir: string;
  baseWeightsPath: string;
  trainableLayers: string[];
} {
  const dataDir = resolveDataDir(flags.data as string | undefined);
  const baseWeightsPath = path.resolve(
    (flags.baseWeights as string | undefined) ?? DEFAULT_BASE_WEIGHTS,
  );
  if (!existsSync(baseWeightsPath)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `base weights file ${baseWeightsPath} not found; pass a ModelWeights ` +
        'file with --base-weights',
    );
  }
  const trainableLayers = String(flags.trainLayers)
    .split(',')
    .map((name) => name.trim());
  try {
    tensorNamesOfLayers(trainableLayers);
  } catch (err) {
    throw new FleetError(ErrorCode.InvalidConfig, (err as Error).message, {
      cause: err,
    });
  }
  const templates = flags.templates as number;
  const templateImages = flags.templateImages as number;
  if (templateImages < templates) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `--template-images ${templateImages} is below --templates ` +
        `${templates}; each template needs images`,
    );
  }
  return { dataDir, baseWeightsPath, trainableLayers };
}

/** Returns why `report` is not a full success, or undefined. */
function failureOf(report: ScaleReport, rounds: number): string | undefined {
  if (report.rounds.length < rounds) {
    return `${report.rounds.length} of ${rounds} rounds ran`;
  }
  const bad = report.rounds.find(
    (row) =>
      row.outcome !== 'closed' ||
      row.accepted !== report.vehicles ||
      row.acksAccepted !== report.vehicles,
  );
  if (bad === undefined) return undefined;
  return (
    `round ${bad.round} ${bad.outcome} ${bad.failureCode} with ` +
    `${bad.accepted} of ${report.vehicles} updates accepted and ` +
    `${bad.acksAccepted} ACCEPTED acks`
  );
}

async function main(): Promise<void> {
  program.parse();
  const flags = program.opts();
  const log = createLogger({ level: flags.logLevel, name: 'simulate-scale' });
  let checked;
  try {
    checked = checkInputs(flags);
  } catch (err) {
    const code = isFleetError(err) ? ` (${err.code})` : '';
    console.error(`simulate-scale: ${(err as Error).message}${code}`);
    process.exit(1);
  }

  const controller = new AbortController();
  let interrupts = 0;
  process.on('SIGINT', () => {
    interrupts += 1;
    // A second Ctrl-C leaves at once; the exit handler kills the children.
    if (interrupts > 1) process.exit(130);
    console.error('simulate-scale: interrupted, stopping the processes');
    controller.abort(new Error('interrupted by SIGINT'));
  });
  process.on('SIGTERM', () => {
    controller.abort(new Error('terminated by SIGTERM'));
  });

  const vehicles = flags.vehicles as number;
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const options: ScaleOptions = {
    ...checked,
    vehicles,
    rounds: flags.rounds,
    seed: flags.seed,
    fleetId: flags.fleetId,
    stateDir: path.resolve(
      flags.stateDir ?? path.join('runs', `simulate-scale-${stamp}`),
    ),
    templates: flags.templates,
    templateImages: flags.templateImages,
    publishWindowMs:
      flags.publishWindowMs ??
      Math.max(MIN_PUBLISH_WINDOW_MS, WINDOW_MS_PER_VEHICLE * vehicles),
    maxPendingUpdates: flags.maxPendingUpdates,
    connectBatch: flags.connectBatch,
    connectIntervalMs: flags.connectIntervalMs,
    aggregatorHeapMb: flags.aggregatorHeapMb,
    roundTimeoutMs: flags.roundTimeoutMs,
    reportPath: flags.report,
    progress: flags.progress && process.stderr.isTTY === true,
    log,
    signal: controller.signal,
  };

  let report: ScaleReport;
  try {
    report = await runScaleSimulation(options);
  } catch (err) {
    const code = isFleetError(err) ? ` (${err.code})` : '';
    console.error(`simulate-scale: ${(err as Error).message}${code}`);
    process.exit(controller.signal.aborted ? 130 : 1);
  }
  printScaleReport(report);
  const failure = failureOf(report, options.rounds);
  if (failure !== undefined) {
    console.error(`simulate-scale: ${failure}`);
    process.exit(1);
  }
  process.exit(0);
}

await main();
