/**
 * Command line of the simulated fleet. See scripts/sim/fleet.ts for what a
 * run does.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import { createLogger, isFleetError } from '../protocol/index.ts';
import {
  parseIntegerAtLeast,
  parseNumberAtLeast,
  parsePositiveNumber,
  addDifferentialPrivacyOptions,
  addNormBoundOptions,
  addSecureAggregationOptions,
  addAsyncBufferOptions,
  asyncBufferOfFlags,
  addServerOptimizerOptions,
  secureAggregationOfFlags,
} from '../protocol/cli-arguments.ts';
import {
  DEFAULT_FAULT_RATE,
  FAULT_KINDS,
  parseFaultList,
  type FaultKind,
} from './sim/faults.ts';
import { runSimulation, type SimulationOptions } from './sim/fleet.ts';
import {
  COMPRESSION_NAMES,
  DEFAULT_TOPK_DENSITY,
  compressionOfFlags,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import { DEFAULT_ATTACK_SCALE, SIM_ATTACK_KINDS } from './sim/attackers.ts';
import {
  AGGREGATION_RULES,
  SERVER_OPTIMIZER_NAMES,
  differentialPrivacyOfFlags,
  normBoundOfFlags,
  parseLiveViewPort,
  resolveNormBound,
  resolveServerOptimizer,
  serverOptimizerOfFlags,
  type DifferentialPrivacyOptions,
  type NormBoundOptions,
  type SecureAggregationOptions,
  type ServerOptimizerOptions,
  type AsyncBufferOptions,
} from '../aggregator/index.ts';

/** Round deadline without faults: long enough for slow training backends. */
const ROUND_TIMEOUT_MS = 600_000;
/**
 * Round deadline with faults. A delay-deadline fault stalls a vehicle's
 * link until its round's deadline has passed, so every such round lasts
 * this long.
 * 10 s leaves room for a 2 s reconnect, a killed agent's restart and its
 * training again with the feature cache on gtsrb32; raise it with
 * --round-timeout-ms for slower training.
 */
const FAULTY_ROUND_TIMEOUT_MS = 10_000;

function parseFaults(text: string): FaultKind[] {
  try {
    return parseFaultList(text);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function parseFaultRate(text: string): number {
  const value = text.trim() === '' ? Number.NaN : Number(text);
  if (!(value > 0 && value <= 1)) {
    throw new InvalidArgumentError(`expected a number in (0, 1], got ${text}`);
  }
  return value;
}

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
    `round deadline (default: ${ROUND_TIMEOUT_MS}, or ` +
      `${FAULTY_ROUND_TIMEOUT_MS} with --faults)`,
    parseIntegerAtLeast(1000),
  )
  .option(
    '--faults <kinds>',
    `inject faults: "all" or a comma-separated list of ${FAULT_KINDS.join(', ')}`,
    parseFaults,
  )
  .option(
    '--fault-rate <fraction>',
    'share of the selected vehicles each fault kind hits per round, seeded ' +
      'by --seed',
    parseFaultRate,
    DEFAULT_FAULT_RATE,
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
  .option(
    '--attackers <count>',
    'the first N vehicles by id attack (see --attack)',
    parseIntegerAtLeast(0),
    0,
  )
  .addOption(
    new Option(
      '--attack <kind>',
      'boost: deltas x scale; sign-flip: deltas x -scale; noise: Gaussian ' +
        "noise of std scale x the update's RMS; label-flip: labels " +
        '42 - label, honest training',
    )
      .choices([...SIM_ATTACK_KINDS])
      .default('boost'),
  )
  .option(
    '--attack-scale <number>',
    'factor of boost and sign-flip, noise std in update RMS units',
    parsePositiveNumber,
    DEFAULT_ATTACK_SCALE,
  )
  .addOption(
    new Option('--aggregation <rule>', 'aggregation rule of the aggregator')
      .choices([...AGGREGATION_RULES])
      .default('fedavg'),
  )
  .option(
    '--byzantine-count <count>',
    'Byzantine updates the median and Krum rules tolerate (f)',
    parseIntegerAtLeast(0),
    0,
  )
  .option(
    '--trim-fraction <number>',
    'share trimmed-mean drops from each end, below 0.5',
    parseNumberAtLeast(0),
    0.2,
  )
  .option(
    '--multi-krum-select <count>',
    'updates Multi-Krum averages (m); 0 means n - f',
    parseIntegerAtLeast(0),
    0,
  )
  .addOption(
    new Option(
      '--update-compression <kind>',
      "encoding of the vehicles' deltas (default float32)",
    ).choices([...COMPRESSION_NAMES]),
  )
  .option(
    '--topk-density <fraction>',
    `share of each tensor a topk update sends, in (0, 1] (default ${DEFAULT_TOPK_DENSITY})`,
    parsePositiveNumber,
  )
  .option(
    '--secure',
    'provision a temporary PKI and run with mutual TLS, the broker ACL, ' +
      'signed releases and signed updates (not with --faults)',
  )
  .addOption(
    new Option('--log-level <level>', 'pino log level of the processes')
      .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default('warn'),
  )
  .option('--no-progress', 'no progress bar (for logs and CI)')
  .option(
    '--live-view-port <port>',
    "serve the aggregator's live view (web page, /api/fleet, /metrics) " +
      'on 127.0.0.1 at this port, 0 for any free port; off by default',
    parseLiveViewPort,
  );

addDifferentialPrivacyOptions(program);
addSecureAggregationOptions(program);
addAsyncBufferOptions(program);
addServerOptimizerOptions(program, SERVER_OPTIMIZER_NAMES);
addNormBoundOptions(program);
program.parse();
const flags = program.opts();
const log = createLogger({ level: flags.logLevel, name: 'fleetlearn' });
const faults: FaultKind[] = flags.faults ?? [];
let differentialPrivacy: DifferentialPrivacyOptions | undefined;
let secureAggregation: SecureAggregationOptions | undefined;
let asyncBuffer: AsyncBufferOptions | undefined;
let updateCompression: UpdateCompression | undefined;
let serverOptimizer: ServerOptimizerOptions | undefined;
let normBound: NormBoundOptions | undefined;
try {
  differentialPrivacy = differentialPrivacyOfFlags(flags);
  secureAggregation = secureAggregationOfFlags(flags);
  asyncBuffer = asyncBufferOfFlags(flags);
  updateCompression = compressionOfFlags(flags);
  serverOptimizer = serverOptimizerOfFlags(flags);
  normBound = normBoundOfFlags(flags);
  // Checked here too, so that a bad value fails before the data loads.
  if (serverOptimizer !== undefined) resolveServerOptimizer(serverOptimizer);
  if (normBound !== undefined) {
    resolveNormBound(normBound, {
      hasSecureAggregation: secureAggregation !== undefined,
      hasDifferentialPrivacy: differentialPrivacy !== undefined,
    });
  }
} catch (err) {
  console.error(`simulate: ${(err as Error).message}`);
  process.exit(1);
}

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
  roundTimeoutMs:
    flags.roundTimeoutMs ??
    (faults.length > 0 ? FAULTY_ROUND_TIMEOUT_MS : ROUND_TIMEOUT_MS),
  stateDir: flags.stateDir,
  centralized: flags.centralized,
  faults,
  faultRate: flags.faultRate,
  secure: flags.secure === true,
  attackers: flags.attackers,
  attack: flags.attack,
  attackScale: flags.attackScale,
  aggregation: flags.aggregation,
  byzantineCount: flags.byzantineCount,
  trimFraction: flags.trimFraction,
  multiKrumSelect: flags.multiKrumSelect,
  differentialPrivacy,
  secureAggregation,
  asyncBuffer,
  updateCompression,
  serverOptimizer,
  normBound,
  baseWeightsPath: flags.baseWeights,
  depotTracksPath: flags.depotTracks,
  progress: flags.progress && process.stderr.isTTY === true,
  liveViewPort: flags.liveViewPort,
  log,
};

try {
  const { delivery } = await runSimulation(options);
  // An accepted bad payload takes the place of a genuine update, so it
  // fails the run like a lost or double-counted one.
  const failures =
    delivery.lost + delivery.doubleCounted + delivery.injectedAccepted;
  if (failures > 0) {
    console.error(
      `simulate: ${delivery.lost} finished updates lost, ` +
        `${delivery.doubleCounted} counted twice and ` +
        `${delivery.injectedAccepted} bad payloads accepted; see ` +
        '"delivery" in the report',
    );
    process.exit(1);
  }
  process.exit(0);
} catch (err) {
  if (isFleetError(err) || err instanceof RangeError) {
    console.error(`simulate: ${(err as Error).message}`);
  } else {
    console.error(err);
  }
  process.exit(1);
}
