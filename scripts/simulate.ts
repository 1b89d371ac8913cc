/**
 * Command line of the simulated fleet. See scripts/sim/fleet.ts for what a
 * run does.
 */
import { Command, Option } from 'commander';
import { createLogger, isFleetError } from '../protocol/index.ts';
import {
  parseIntegerAtLeast,
  parseNumberAtLeast,
  parsePositiveNumber,
} from '../protocol/cli-arguments.ts';
import { runSimulation, type SimulationOptions } from './sim/fleet.ts';

const program = new Command('simulate')
  .description(
    'Run a simulated fleet: embedded broker, aggregator and N vehicle ' +
      'agents with non-IID shares of the training images.',
  )
  .option(
    '--vehicles <count>',
    'number of vehicles',
    parseIntegerAtLeast(1),
    10,
  )
  .option(
    '--rounds <count>',
    'number of federated rounds',
    parseIntegerAtLeast(1),
    20,
  )
  .option(
    '--data <dir>',
    'data directory in GTSRB layout (default: $FLEETLEARN_DATA, then ' +
      'data/gtsrb32-full, data/gtsrb32, ../shared/data/gtsrb32)',
  )
  .option(
    '--seed <integer>',
    'seed for splits, selection and training',
    parseIntegerAtLeast(0),
    1,
  )
  .option('--report <file>', 'write the JSON report to this file')
  .option(
    '--alpha <number>',
    'Dirichlet concentration of the class split; smaller is more skewed',
    parsePositiveNumber,
    0.5,
  )
  .option(
    '--local-epochs <count>',
    'epochs each vehicle trains per round',
    parseIntegerAtLeast(1),
    1,
  )
  .option(
    '--batch-size <count>',
    'local batch size',
    parseIntegerAtLeast(1),
    32,
  )
  .option(
    '--learning-rate <number>',
    'local learning rate',
    parsePositiveNumber,
    0.001,
  )
  .option(
    '--proximal-mu <number>',
    'FedProx coefficient, 0 for FedAvg',
    parseNumberAtLeast(0),
    0,
  )
  .option(
    '--no-restrict-local-classes',
    'vehicles train with a softmax over all classes, not only their own',
  )
  .option(
    '--train-layers <names>',
    'comma-separated layers the vehicles train',
    'dense1,dense2',
  )
  .option(
    '--min-updates <count>',
    'quorum of accepted updates per round (default: half the vehicles)',
    parseIntegerAtLeast(1),
  )
  .option(
    '--round-timeout-ms <ms>',
    'round deadline',
    parseIntegerAtLeast(1000),
    600_000,
  )
  .option(
    '--state-dir <dir>',
    'where the aggregator and agents keep state (default: runs/simulate-<time>)',
  )
  .option(
    '--base-weights <file>',
    'base model weights (default: models/base/gtsrb-cnn-v0.weights.pb)',
  )
  .option(
    '--depot-tracks <file>',
    'JSON list of track ids kept from the vehicles (default: models/base/depot-tracks.json)',
  )
  .option('--no-centralized', 'skip the centralized baseline')
  .addOption(
    new Option('--log-level <level>', 'pino log level of the processes')
      .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default('warn'),
  )
  .option('--no-progress', 'no progress bar (for logs and CI)');

program.parse();
const flags = program.opts();
const log = createLogger({ level: flags.logLevel, name: 'fleetlearn' });

const options: SimulationOptions = {
  vehicles: flags.vehicles,
  rounds: flags.rounds,
  dataDir: flags.data,
  seed: flags.seed,
  reportPath: flags.report,
  alpha: flags.alpha,
  localEpochs: flags.localEpochs,
  batchSize: flags.batchSize,
  learningRate: flags.learningRate,
  proximalMu: flags.proximalMu,
  restrictToLocalClasses: flags.restrictLocalClasses,
  trainLayers: String(flags.trainLayers)
    .split(',')
    .map((name) => name.trim()),
  minUpdates: flags.minUpdates,
  roundTimeoutMs: flags.roundTimeoutMs,
  stateDir: flags.stateDir,
  centralized: flags.centralized,
  baseWeightsPath: flags.baseWeights,
  depotTracksPath: flags.depotTracks,
  progress: flags.progress && process.stderr.isTTY === true,
  log,
};

try {
  await runSimulation(options);
  process.exit(0);
} catch (err) {
  if (isFleetError(err) || err instanceof RangeError) {
    console.error(`simulate: ${(err as Error).message}`);
  } else {
    console.error(err);
  }
  process.exit(1);
}
