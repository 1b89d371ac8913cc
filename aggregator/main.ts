/**
 * Command line of the aggregator:
 * `npx tsx aggregator/main.ts --fleet-id demo --state-dir state/aggregator`.
 */
import { fileURLToPath } from 'node:url';
import { Command, Option } from 'commander';
import {
  createLogger,
  defaultLogLevel,
  DEFAULT_MAX_MESSAGE_BYTES,
  isFleetError,
  readClientConfig,
  readSigningConfig,
  type Logger,
} from '../protocol/index.ts';
import { IMAGE_VALUES, loadLabelledImages, subset } from '../models/index.ts';
import {
  COMPRESSION_NAMES,
  DEFAULT_TOPK_DENSITY,
  compressionOfFlags,
} from '../protocol/compression/index.ts';
import { Aggregator } from './aggregator.ts';
import { parseLiveViewPort } from './live-view/index.ts';
import { differentialPrivacyOfFlags, type DpFlags } from './privacy-round.ts';
import { normBoundOfFlags, type NormBoundFlags } from './round-norm-bound.ts';
import {
  serverOptimizerOfFlags,
  type ServerOptimizerFlags,
} from './server-step.ts';
import { SERVER_OPTIMIZER_NAMES } from './strategies/index.ts';
import {
  AGGREGATION_RULES,
  type AggregationRule,
  type AggregatorOptions,
} from './options.ts';
import {
  parseIntegerAtLeast,
  parseNumberAtLeast,
  parsePositiveNumber,
  reportStartError,
  addDifferentialPrivacyOptions,
  addNormBoundOptions,
  addSecureAggregationOptions,
  addAsyncBufferOptions,
  asyncBufferOfFlags,
  type AsyncBufferFlags,
  addServerOptimizerOptions,
  secureAggregationOfFlags,
  type SecureAggregationFlags,
  brokerSecurityOfFlags,
} from '../protocol/cli-arguments.ts';
import { startOrExit, stopOnSignals } from '../protocol/cli-lifecycle.ts';

const DEFAULT_BASE_WEIGHTS = fileURLToPath(
  new URL('../models/base/gtsrb-cnn-v0.weights.pb', import.meta.url),
);

const program = new Command('aggregator')
  .description('Run federated rounds for one fleet over MQTT.')
  .option('--fleet-id <id>', 'fleet id (one MQTT topic level)', 'default')
  .option('--broker-url <url>', 'MQTT broker URL', 'mqtt://127.0.0.1:1883')
  .option('--state-dir <dir>', 'state.json and model store', 'state/aggregator')
  .option(
    '--base-weights <file>',
    'weights of model version 0',
    DEFAULT_BASE_WEIGHTS,
  )
  .option(
    '--trainable-layers <names>',
    'comma-separated layers vehicles train',
    'dense1,dense2',
  )
  .option(
    '--local-epochs <count>',
    'local epochs per round',
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
    '--vehicles-per-round <count>',
    'vehicles selected per round, 0 for all online',
    parseIntegerAtLeast(0),
    0,
  )
  .option(
    '--min-vehicles-online <count>',
    'online vehicles to wait for before a round',
    parseIntegerAtLeast(1),
    1,
  )
  .option(
    '--online-wait-timeout-ms <ms>',
    'wait for --min-vehicles-online at most this long',
    parseIntegerAtLeast(0),
    60_000,
  )
  .option(
    '--min-updates <count>',
    'accepted updates a round needs (quorum)',
    parseIntegerAtLeast(1),
    1,
  )
  .option(
    '--round-timeout-ms <ms>',
    'round deadline after it opens',
    parseIntegerAtLeast(1),
    300_000,
  )
  .option(
    '--max-rounds <count>',
    'rounds to run, 0 to run until stopped',
    parseIntegerAtLeast(0),
    0,
  )
  .option(
    '--seed <integer>',
    'seed of vehicle selection',
    parseIntegerAtLeast(0),
    1,
  )
  .option(
    '--max-message-bytes <bytes>',
    'maximum size of an update, a release notice or a release chunk',
    parseIntegerAtLeast(1024),
    DEFAULT_MAX_MESSAGE_BYTES,
  )
  .option(
    '--max-examples-per-update <count>',
    'reject updates that claim more training examples than this',
    parseIntegerAtLeast(1),
    1_000_000,
  )
  .option(
    '--max-abs-delta-value <number>',
    'reject updates with a delta value whose magnitude is above this',
    parseNumberAtLeast(0),
    1000,
  )
  .addOption(
    new Option(
      '--update-compression <kind>',
      "encoding of the vehicles' deltas, announced in each round task " +
        '(default float32)',
    ).choices([...COMPRESSION_NAMES]),
  )
  .option(
    '--topk-density <fraction>',
    `share of each tensor a topk update sends, in (0, 1] (default ${DEFAULT_TOPK_DENSITY})`,
    parsePositiveNumber,
  )
  .addOption(
    new Option(
      '--aggregation <rule>',
      'how a round becomes one delta; the robust rules are unweighted',
    )
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
    'share of values trimmed-mean drops from each end, below 0.5',
    parseNumberAtLeast(0),
    0.2,
  )
  .option(
    '--multi-krum-select <count>',
    'updates Multi-Krum averages (m); 0 means n - f',
    parseIntegerAtLeast(0),
    0,
  )
  .option(
    '--export-tolerance-abs <number>',
    'max ONNX-vs-TF.js probability difference',
    parseNumberAtLeast(0),
    1e-3,
  )
  .option(
    '--test-data <dir>',
    'data directory whose test split measures accuracy and feeds the export check',
  )
  .option(
    '--test-limit <count>',
    'use at most this many test images',
    parseIntegerAtLeast(1),
  )
  .option(
    '--probe-count <count>',
    'test images in the export check batch',
    parseIntegerAtLeast(1),
    16,
  )
  .option(
    '--rollback-to <version>',
    'at start, make this older stored model version the current one again',
    parseIntegerAtLeast(0),
  )
  .option(
    '--config <file>',
    'aggregator.json from `provision issue-aggregator`: fleet id, broker ' +
      'URL and TLS files; --fleet-id and --broker-url override it',
  )
  .option('--tls-ca <file>', 'fleet CA certificate (PEM)')
  .option('--tls-cert <file>', "the aggregator's certificate (PEM)")
  .option(
    '--tls-key <file>',
    "the aggregator's private key (PEM); must have mode 0600",
  )
  .option(
    '--username <name>',
    'MQTT username; the password comes from $FLEETLEARN_BROKER_PASSWORD',
  )
  .option(
    '--release-signing-key <file>',
    'Ed25519 private key (PEM, mode 0600) that signs every release ' +
      'notice; default releaseSigningKeyPath of --config, else unsigned',
  )
  .option(
    '--vehicle-keys <path>',
    "JSON file or directory of the vehicles' public update keys; with it " +
      'only updates signed by their vehicle count; default ' +
      'vehicleKeysPath of --config',
  )
  .option(
    '--live-view-port <port>',
    'serve the live view (web page, /api/fleet, Prometheus /metrics) on ' +
      '127.0.0.1 at this port, 0 for any free port; off by default',
    parseLiveViewPort,
  )
  .option(
    '--depots <ids>',
    'comma-separated ids of the depot aggregators whose partial ' +
      'aggregates count in the rounds; off by default',
  )
  .option(
    '--staged-releases',
    'store and hold each new version instead of publishing it; rounds ' +
      'wait until the rollout controller promotes or pins a stored version',
  )
  .addOption(
    new Option('--log-level <level>', 'pino log level')
      .choices(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
      .default(defaultLogLevel()),
  );

interface Flags extends ServerOptimizerFlags, NormBoundFlags {
  fleetId: string;
  brokerUrl: string;
  stateDir: string;
  baseWeights: string;
  trainableLayers: string;
  localEpochs: number;
  batchSize: number;
  learningRate: number;
  proximalMu: number;
  restrictLocalClasses: boolean;
  vehiclesPerRound: number;
  minVehiclesOnline: number;
  onlineWaitTimeoutMs: number;
  minUpdates: number;
  roundTimeoutMs: number;
  maxRounds: number;
  seed: number;
  maxMessageBytes: number;
  maxExamplesPerUpdate: number;
  maxAbsDeltaValue: number;
  updateCompression?: string;
  topkDensity?: number;
  aggregation: AggregationRule;
  byzantineCount: number;
  trimFraction: number;
  multiKrumSelect: number;
  exportToleranceAbs: number;
  dpClipNorm?: number;
  dpNoiseMultiplier?: number;
  dpTargetEpsilon?: number;
  dpDelta?: number;
  secureAggregation?: boolean;
  asyncBufferSize?: number;
  maxStaleness?: number;
  stalenessExponent?: number;
  secaggClipNorm?: number;
  secaggThresholdFraction?: number;
  secaggPhaseTimeoutMs?: number;
  testData?: string;
  testLimit?: number;
  probeCount: number;
  rollbackTo?: number;
  config?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  username?: string;
  releaseSigningKey?: string;
  vehicleKeys?: string;
  liveViewPort?: number;
  stagedReleases?: boolean;
  depots?: string;
  logLevel: string;
}

/**
 * Applies --config and the TLS and username flags: fleet id and broker URL
 * from the file unless given on the command line, and the credentials.
 */
function connectionOf(
  flags: Flags,
): Pick<AggregatorOptions, 'fleetId' | 'brokerUrl' | 'security'> {
  const config =
    flags.config === undefined ? undefined : readClientConfig(flags.config);
  const fromCli = (name: string): boolean =>
    program.getOptionValueSource(name) === 'cli';
  return {
    fleetId:
      config === undefined || fromCli('fleetId')
        ? flags.fleetId
        : config.fleetId,
    brokerUrl:
      config === undefined || fromCli('brokerUrl')
        ? flags.brokerUrl
        : config.brokerUrl,
    security: brokerSecurityOfFlags(flags, config?.tls),
  };
}

/** Key files from the flags, else from the --config file. */
function signingOf(
  flags: Flags,
): Pick<AggregatorOptions, 'releaseSigningKeyPath' | 'vehicleKeysPath'> {
  const config =
    flags.config === undefined ? {} : readSigningConfig(flags.config);
  return {
    releaseSigningKeyPath:
      flags.releaseSigningKey ?? config.releaseSigningKeyPath,
    vehicleKeysPath: flags.vehicleKeys ?? config.vehicleKeysPath,
  };
}

/** Loads the test split and takes the probe batch evenly spaced from it. */
async function loadTestData(
  flags: Flags,
  log: Logger,
): Promise<Partial<AggregatorOptions>> {
  if (flags.testData === undefined) return {};
  const test = await loadLabelledImages(flags.testData, {
    split: 'test',
    limit: flags.testLimit,
  });
  const probeCount = Math.min(flags.probeCount, test.count);
  const step = test.count / probeCount;
  const probe = subset(
    test,
    Array.from({ length: probeCount }, (_, i) => Math.floor(i * step)),
  );
  log.info(
    { dir: flags.testData, count: test.count, probeCount },
    'test data loaded',
  );
  return {
    testSet: { images: test.images, labels: test.labels },
    probeImages: probe.images,
    probeCount: probe.images.length / IMAGE_VALUES,
  };
}

function optionsOf(flags: Flags, log: Logger): AggregatorOptions {
  return {
    ...connectionOf(flags),
    ...signingOf(flags),
    stateDir: flags.stateDir,
    baseWeightsPath: flags.baseWeights,
    trainableLayers: flags.trainableLayers
      .split(',')
      .map((name) => name.trim()),
    localEpochs: flags.localEpochs,
    batchSize: flags.batchSize,
    learningRate: flags.learningRate,
    proximalMu: flags.proximalMu,
    restrictToLocalClasses: flags.restrictLocalClasses,
    vehiclesPerRound: flags.vehiclesPerRound,
    minVehiclesOnline: flags.minVehiclesOnline,
    onlineWaitTimeoutMs: flags.onlineWaitTimeoutMs,
    minUpdates: flags.minUpdates,
    roundTimeoutMs: flags.roundTimeoutMs,
    maxRounds: flags.maxRounds,
    seed: flags.seed,
    maxMessageBytes: flags.maxMessageBytes,
    maxExamplesPerUpdate: flags.maxExamplesPerUpdate,
    maxAbsDeltaValue: flags.maxAbsDeltaValue,
    updateCompression: compressionOfFlags(flags),
    aggregation: flags.aggregation,
    byzantineCount: flags.byzantineCount,
    trimFraction: flags.trimFraction,
    multiKrumSelect: flags.multiKrumSelect,
    exportToleranceAbs: flags.exportToleranceAbs,
    rollbackToVersion: flags.rollbackTo,
    liveViewPort: flags.liveViewPort,
    stagedReleases: flags.stagedReleases,
    depots: flags.depots?.split(',').map((id) => id.trim()),
    differentialPrivacy: differentialPrivacyOfFlags(flags satisfies DpFlags),
    secureAggregation: secureAggregationOfFlags(
      flags satisfies SecureAggregationFlags,
    ),
    asyncBuffer: asyncBufferOfFlags(flags satisfies AsyncBufferFlags),
    serverOptimizer: serverOptimizerOfFlags(flags),
    normBound: normBoundOfFlags(flags),
    log,
  };
}

async function main(): Promise<void> {
  addDifferentialPrivacyOptions(program);
  addSecureAggregationOptions(program);
  addAsyncBufferOptions(program);
  addServerOptimizerOptions(program, SERVER_OPTIMIZER_NAMES);
  addNormBoundOptions(program);
  program.parse();
  const flags = program.opts<Flags>();
  const log = createLogger({ level: flags.logLevel });

  let aggregator: Aggregator;
  try {
    const testData = await loadTestData(flags, log);
    aggregator = new Aggregator({ ...optionsOf(flags, log), ...testData });
  } catch (err) {
    reportStartError('aggregator', err, log, 'invalid configuration');
    process.exit(2);
  }

  const shutdown = stopOnSignals(aggregator, log);
  if (!(await startOrExit('aggregator', aggregator, shutdown, log))) return;
  await aggregator.whenFinished();
  await shutdown.stop('finished');
  process.exit(0);
}

await main();
