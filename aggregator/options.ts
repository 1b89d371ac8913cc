import {
  DEFAULT_MAX_MESSAGE_BYTES,
  ErrorCode,
  FleetError,
  assertTopicLevel,
  loadSigningKey,
  readPublicKeys,
  type BrokerClientSecurity,
  type Logger,
  type PublicKeySet,
  type SigningKey,
} from '../protocol/index.ts';
import {
  DEFAULT_TRAINABLE_LAYERS,
  IMAGE_CHANNELS,
  IMAGE_SIZE,
  MODEL_NAME,
  NUM_CLASSES,
  tensorNamesOfLayers,
} from '../models/architecture.ts';
import { createRandom } from '../models/random.ts';
import {
  NO_COMPRESSION,
  checkUpdateCompression,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import { chunkSizeFor } from './release-messages.ts';
import {
  resolveDifferentialPrivacy,
  type DifferentialPrivacyOptions,
  type ResolvedDifferentialPrivacy,
} from './privacy-round.ts';
import {
  resolveSecureAggregation,
  type ResolvedSecureAggregation,
  type SecureAggregationOptions,
} from './secure-options.ts';
import {
  resolveAsyncBuffer,
  type AsyncBufferOptions,
  type ResolvedAsyncBuffer,
} from './async-options.ts';
import {
  MAX_ABS_WEIGHTED_DELTA,
  MAX_EXAMPLES_PER_ADD,
  MAX_UPDATES,
} from './fedavg.ts';
import { resolveNormBound } from './round-norm-bound.ts';
import { resolveDepots } from './depot-options.ts';
import {
  resolveServerOptimizer,
  type ServerOptimizerOptions,
} from './server-step.ts';
import type {
  NormBoundOptions,
  ServerOptimizerConfig,
} from './strategies/index.ts';
import { optionChecks, type OptionChecks } from '../protocol/option-checks.ts';

const IMAGE_VALUES = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS;

/** Images with labels, for the aggregator's accuracy measurement. */
export interface TestSet {
  /** NHWC [count, 32, 32, 3], values in [0, 1]. */
  images: Float32Array;
  /** Class ids, one per image. */
  labels: Int32Array;
}

/** Rules that turn a round's accepted updates into one mean delta. */
export const AGGREGATION_RULES = [
  'fedavg',
  'median',
  'trimmed-mean',
  'krum',
  'multi-krum',
] as const;

/** One of AGGREGATION_RULES. */
export type AggregationRule = (typeof AGGREGATION_RULES)[number];

/** Options of the Aggregator. Only the four paths and ids are required. */
export interface AggregatorOptions {
  /** Fleet id; one MQTT topic level. */
  fleetId: string;
  /** Broker URL, for example mqtt://127.0.0.1:1883. */
  brokerUrl: string;
  /** Directory of state.json and the model store; created when missing. */
  stateDir: string;
  /** Weights file of model version 0, used when stateDir is new. */
  baseWeightsPath: string;
  /** Layers vehicles train. Default: dense1, dense2. */
  trainableLayers?: readonly string[];
  /** Local epochs per round. Default 1. */
  localEpochs?: number;
  /** Local batch size. Default 32. */
  batchSize?: number;
  /** Local learning rate. Default 0.001 (vehicles train with Adam). */
  learningRate?: number;
  /** FedProx proximal coefficient; 0 (default) is plain FedAvg. */
  proximalMu?: number;
  /**
   * Vehicles restrict the softmax to the classes in their own examples.
   * Default true, because fleet data is label-skewed.
   */
  restrictToLocalClasses?: boolean;
  /** Vehicles asked per round; 0 (default) selects every online vehicle. */
  vehiclesPerRound?: number;
  /**
   * Online vehicles to wait for before a round opens. Default 1. After
   * `onlineWaitTimeoutMs` a round opens with fewer, if at least
   * `minUpdates` are online.
   */
  minVehiclesOnline?: number;
  /** How long to wait for `minVehiclesOnline`. Default 60,000 ms. */
  onlineWaitTimeoutMs?: number;
  /** Quorum: accepted updates a round needs. Default 1. */
  minUpdates?: number;
  /** Deadline of a round after it opens. Default 300,000 ms. */
  roundTimeoutMs?: number;
  /** Rounds to run (closed or failed) before stopping; 0 (default) runs on. */
  maxRounds?: number;
  /** Seed of vehicle selection. Default 1. */
  seed?: number;
  /**
   * Maximum size of an update, a release notice or one release chunk.
   * Release chunks are sized to fill it. Default 64 MiB.
   */
  maxMessageBytes?: number;
  /**
   * Maximum numExamples of one update. Default 1,000,000. It bounds the
   * weight one vehicle gets in FedAvg.
   */
  maxExamplesPerUpdate?: number;
  /** Maximum |value| of a delta element. Default 1000. */
  maxAbsDeltaValue?: number;
  /**
   * Encoding of the vehicles' deltas, announced in every round task.
   * Updates in another encoding are rejected. Default float32.
   */
  updateCompression?: UpdateCompression;
  /**
   * Rule that turns a round's accepted updates into its mean delta.
   * 'fedavg' (default) streams a weighted mean. The robust rules in
   * aggregator/strategies/ are unweighted and keep every accepted update
   * of the round in memory. A round with too few updates for the rule's
   * requirement fails with ROBUST_RULE_UNSATISFIED.
   */
  aggregation?: AggregationRule;
  /** Byzantine updates the median and Krum rules tolerate, f. Default 0. */
  byzantineCount?: number;
  /** Share trimmed from each end by 'trimmed-mean', in [0, 0.5). Default 0.2. */
  trimFraction?: number;
  /** Updates Multi-Krum averages, m; 0 (default) means n - f. */
  multiKrumSelect?: number;
  /**
   * DP-FedAvg (central DP, clipping on the aggregator); only with
   * aggregation 'fedavg'. Off by default. See aggregator/privacy-round.ts.
   */
  differentialPrivacy?: DifferentialPrivacyOptions;
  /**
   * Secure aggregation: vehicles mask their updates so that only the
   * round's sum is seen; only with aggregation 'fedavg'. Off by default.
   * See aggregator/secure-round.ts.
   */
  secureAggregation?: SecureAggregationOptions;
  /**
   * Server optimizer that turns each round's mean delta into the step
   * applied to the weights (FedAvgM, FedAdagrad, FedAdam, FedYogi), with
   * its moments in stateDir/server-optimizer.json. Off by default: the
   * mean delta is added as it is. See aggregator/server-step.ts.
   */
  serverOptimizer?: ServerOptimizerOptions;
  /**
   * Clip or drop updates whose L2 norm is above a multiple of the round's
   * median norm (medianFactor), above maxNorm, or both, before the
   * aggregation rule. The round keeps its updates in memory. Not with
   * secureAggregation or differentialPrivacy. Off by default. See
   * aggregator/round-norm-bound.ts.
   */
  normBound?: NormBoundOptions;
  /**
   * Asynchronous mode (FedBuff): step the model after every bufferSize
   * accepted updates, taking updates from earlier rounds and weighting
   * them down by their version lag. Only with aggregation fedavg, without
   * DP, secure aggregation or a norm bound. Off by default. See
   * aggregator/async-options.ts.
   */
  asyncBuffer?: AsyncBufferOptions;
  /**
   * Images (NHWC, [0, 1]) on which the exported ONNX model must match
   * TF.js. Default: 8 seeded random images.
   */
  probeImages?: Float32Array;
  /** Number of images in `probeImages`. */
  probeCount?: number;
  /**
   * Maximum ONNX-vs-TF.js probability difference. Default 1e-3: float32
   * kernels differ by up to about 2e-4 once weights have grown over
   * hundreds of rounds, while a layout error differs by far more.
   */
  exportToleranceAbs?: number;
  /** Test split; when given, every release carries its top-1 accuracy. */
  testSet?: TestSet;
  /** Parent logger; the aggregator logs through a child. */
  log?: Logger;
  /**
   * Client certificate and key (with an `mqtts://` brokerUrl), or a
   * username and password, for the broker connection.
   */
  security?: BrokerClientSecurity;
  /**
   * Model version to roll back to in `start()`, before the first round.
   * It must be stored and older than the current version; see
   * `Aggregator.rollbackTo`.
   */
  rollbackToVersion?: number;
  /**
   * Ed25519 private key (PKCS#8 PEM, mode 0600 or stricter) that signs
   * every release notice. Without it notices go out unsigned.
   */
  releaseSigningKeyPath?: string;
  /**
   * JSON file, or directory of JSON files, with the vehicles' public
   * update-signing keys (see `provision issue-vehicle`). With it every
   * update must be signed with the key of the vehicle it names. Without
   * it unsigned updates are accepted, and a signed update is unwrapped
   * without a check.
   */
  vehicleKeysPath?: string;
  /**
   * TCP port on 127.0.0.1 of the live view: a web page, `/api/fleet` and
   * Prometheus `/metrics` (see aggregator/live-view/). 0 picks a free
   * port. Off when undefined (default).
   */
  liveViewPort?: number;
  /**
   * Leave `releases/current` to the rollout controller: each new version
   * is stored and held, and no round opens until the fleet-wide release
   * names a stored version, which the next round trains from (see
   * staged-release.ts). Default false: every version is published.
   */
  stagedReleases?: boolean;
  /**
   * Ids of the depot aggregators whose partial aggregates this aggregator
   * counts, each one MQTT topic level (see aggregator/depot-partials.ts).
   * Only with aggregation fedavg, without differential privacy, secure
   * aggregation, a norm bound, the asynchronous buffer or vehicle keys.
   * Default empty: hierarchical aggregation is off.
   */
  depots?: readonly string[];
}

/** Options with defaults filled in and checked. */
export type ResolvedOptions = Required<
  Omit<
    AggregatorOptions,
    | 'testSet'
    | 'log'
    | 'rollbackToVersion'
    | 'security'
    | 'releaseSigningKeyPath'
    | 'vehicleKeysPath'
    | 'differentialPrivacy'
    | 'secureAggregation'
    | 'liveViewPort'
    | 'serverOptimizer'
    | 'normBound'
    | 'asyncBuffer'
  >
> & {
  testSet?: TestSet;
  security?: BrokerClientSecurity;
  rollbackToVersion?: number;
  differentialPrivacy?: ResolvedDifferentialPrivacy;
  secureAggregation?: ResolvedSecureAggregation;
  liveViewPort?: number;
  serverOptimizer?: ServerOptimizerConfig;
  normBound?: NormBoundOptions;
  asyncBuffer?: ResolvedAsyncBuffer;
  trainableTensors: string[];
  /** Loaded from releaseSigningKeyPath. */
  releaseSigningKey?: SigningKey;
  /** Loaded from vehicleKeysPath; every key names its vehicle. */
  vehicleKeys?: PublicKeySet;
};

const { invalid, requireInteger, requireDuration, requireText }: OptionChecks =
  optionChecks('aggregator option');

/**
 * Loads the vehicles' public keys and checks that each names its vehicle.
 *
 * @throws {FleetError} INVALID_CONFIG from readPublicKeys, or for a key
 *   without a vehicleId.
 */
function loadVehicleKeys(keysPath: string): PublicKeySet {
  requireText('vehicleKeysPath', keysPath);
  const keys = readPublicKeys(keysPath);
  for (const key of keys.values()) {
    if (key.vehicleId === undefined) {
      invalid(
        'vehicleKeysPath',
        keysPath,
        `a vehicleId on every key, but key ${key.keyId} has none`,
      );
    }
  }
  return keys;
}

/**
 * Fills in defaults and checks every option, and loads the signing keys.
 *
 * @throws {TypeError} for a missing or non-string id or path.
 * @throws {FleetError} INVALID_CONFIG naming the option for a value that
 *   cannot work, for example minUpdates above vehiclesPerRound, or for a
 *   key file that cannot be used (a private key its group or others can
 *   read, a key that is not Ed25519).
 */
export function resolveOptions(options: AggregatorOptions): ResolvedOptions {
  for (const key of ['fleetId', 'brokerUrl', 'stateDir', 'baseWeightsPath']) {
    requireText(key, options[key as keyof AggregatorOptions]);
  }
  try {
    assertTopicLevel('fleet id', options.fleetId);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option fleetId: ${(err as Error).message}`,
    );
  }

  const resolved = {
    fleetId: options.fleetId,
    brokerUrl: options.brokerUrl,
    stateDir: options.stateDir,
    baseWeightsPath: options.baseWeightsPath,
    trainableLayers: [...(options.trainableLayers ?? DEFAULT_TRAINABLE_LAYERS)],
    localEpochs: options.localEpochs ?? 1,
    batchSize: options.batchSize ?? 32,
    learningRate: options.learningRate ?? 0.001,
    proximalMu: options.proximalMu ?? 0,
    restrictToLocalClasses: options.restrictToLocalClasses ?? true,
    vehiclesPerRound: options.vehiclesPerRound ?? 0,
    minVehiclesOnline: options.minVehiclesOnline ?? 1,
    onlineWaitTimeoutMs: options.onlineWaitTimeoutMs ?? 60_000,
    // Secure aggregation needs at least 2, since one input would be seen.
    minUpdates:
      options.minUpdates ?? (options.secureAggregation === undefined ? 1 : 2),
    roundTimeoutMs: options.roundTimeoutMs ?? 300_000,
    maxRounds: options.maxRounds ?? 0,
    seed: options.seed ?? 1,
    maxMessageBytes: options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES,
    maxExamplesPerUpdate: options.maxExamplesPerUpdate ?? 1_000_000,
    maxAbsDeltaValue: options.maxAbsDeltaValue ?? 1000,
    updateCompression: resolveUpdateCompression(options.updateCompression),
    aggregation: options.aggregation ?? 'fedavg',
    byzantineCount: options.byzantineCount ?? 0,
    trimFraction: options.trimFraction ?? 0.2,
    multiKrumSelect: options.multiKrumSelect ?? 0,
    exportToleranceAbs: options.exportToleranceAbs ?? 1e-3,
    testSet: options.testSet,
    security: options.security,
    rollbackToVersion: options.rollbackToVersion,
    liveViewPort: options.liveViewPort,
    stagedReleases: options.stagedReleases ?? false,
    ...resolveProbe(options),
    releaseSigningKey:
      options.releaseSigningKeyPath === undefined
        ? undefined
        : loadSigningKey(options.releaseSigningKeyPath),
    vehicleKeys:
      options.vehicleKeysPath === undefined
        ? undefined
        : loadVehicleKeys(options.vehicleKeysPath),
  };
  checkNumbers(resolved);
  const differentialPrivacy =
    options.differentialPrivacy === undefined
      ? undefined
      : resolveDifferentialPrivacy(
          options.differentialPrivacy,
          resolved.aggregation,
          resolved.seed,
        );
  return {
    ...resolved,
    differentialPrivacy,
    secureAggregation:
      options.secureAggregation === undefined
        ? undefined
        : resolveSecureAggregation(options.secureAggregation, {
            ...resolved,
            differentialPrivacy,
          }),
    serverOptimizer:
      options.serverOptimizer === undefined
        ? undefined
        : resolveServerOptimizer(options.serverOptimizer),
    normBound:
      options.normBound === undefined
        ? undefined
        : resolveNormBound(options.normBound, {
            hasSecureAggregation: options.secureAggregation !== undefined,
            hasDifferentialPrivacy: differentialPrivacy !== undefined,
          }),
    asyncBuffer:
      options.asyncBuffer === undefined
        ? undefined
        : resolveAsyncBuffer(options.asyncBuffer, {
            ...resolved,
            differentialPrivacy,
            secureAggregation: options.secureAggregation,
            normBound: options.normBound,
          }),
    trainableTensors: resolveTrainableTensors(resolved.trainableLayers),
    depots: resolveDepots(options.depots, {
      aggregation: resolved.aggregation,
      differentialPrivacy,
      secureAggregation: options.secureAggregation,
      normBound: options.normBound,
      asyncBuffer: options.asyncBuffer,
      vehicleKeysPath: options.vehicleKeysPath,
    }),
  };
}

function checkNumbers(
  options: Omit<ResolvedOptions, 'trainableTensors' | 'depots'>,
): void {
  requireInteger('localEpochs', options.localEpochs, 1);
  requireInteger('batchSize', options.batchSize, 1);
  if (!(options.learningRate > 0) || !Number.isFinite(options.learningRate)) {
    invalid('learningRate', options.learningRate, 'a positive number');
  }
  if (!(options.proximalMu >= 0) || !Number.isFinite(options.proximalMu)) {
    invalid('proximalMu', options.proximalMu, 'a number >= 0');
  }

  requireInteger('vehiclesPerRound', options.vehiclesPerRound, 0);
  requireInteger('minVehiclesOnline', options.minVehiclesOnline, 1);
  requireDuration('onlineWaitTimeoutMs', options.onlineWaitTimeoutMs, 0);
  requireInteger('minUpdates', options.minUpdates, 1);
  if (
    options.vehiclesPerRound > 0 &&
    options.minUpdates > options.vehiclesPerRound
  ) {
    invalid(
      'minUpdates',
      options.minUpdates,
      `at most vehiclesPerRound (${options.vehiclesPerRound}), or the ` +
        'quorum can never be met',
    );
  }

  requireDuration('roundTimeoutMs', options.roundTimeoutMs, 1);
  requireInteger('maxRounds', options.maxRounds, 0);
  requireInteger('seed', options.seed, 0);
  requireInteger('maxMessageBytes', options.maxMessageBytes, 1024);
  chunkSizeFor(options.maxMessageBytes, MODEL_NAME);
  if (options.rollbackToVersion !== undefined) {
    requireInteger('rollbackToVersion', options.rollbackToVersion, 0);
  }
  const port = options.liveViewPort;
  const isPort = Number.isSafeInteger(port) && port! >= 0 && port! <= 65_535;
  if (port !== undefined && !isPort) {
    invalid('liveViewPort', port, 'a TCP port 0-65535, 0 for any free port');
  }
  requireInteger('maxExamplesPerUpdate', options.maxExamplesPerUpdate, 1);
  if (
    !(options.maxAbsDeltaValue > 0) ||
    !Number.isFinite(options.maxAbsDeltaValue)
  ) {
    invalid('maxAbsDeltaValue', options.maxAbsDeltaValue, 'a positive number');
  }
  checkAccumulatorBounds(options);
  checkAggregation(options);
  if (!(options.exportToleranceAbs > 0)) {
    invalid(
      'exportToleranceAbs',
      options.exportToleranceAbs,
      'a positive number',
    );
  }
  if (options.testSet !== undefined) checkTestSet(options.testSet);
}

/** Checks that every update that passes validation fits FedAvgAccumulator. */
function checkAccumulatorBounds(
  options: Pick<
    ResolvedOptions,
    'maxExamplesPerUpdate' | 'maxAbsDeltaValue' | 'vehiclesPerRound'
  >,
): void {
  if (options.maxExamplesPerUpdate > MAX_EXAMPLES_PER_ADD) {
    invalid(
      'maxExamplesPerUpdate',
      options.maxExamplesPerUpdate,
      `at most ${MAX_EXAMPLES_PER_ADD}`,
    );
  }
  const weighted = options.maxAbsDeltaValue * options.maxExamplesPerUpdate;
  if (weighted > MAX_ABS_WEIGHTED_DELTA) {
    invalid(
      'maxAbsDeltaValue',
      options.maxAbsDeltaValue,
      `at most ${MAX_ABS_WEIGHTED_DELTA} / maxExamplesPerUpdate ` +
        `(${options.maxExamplesPerUpdate})`,
    );
  }
  if (options.vehiclesPerRound > MAX_UPDATES) {
    invalid(
      'vehiclesPerRound',
      options.vehiclesPerRound,
      `at most ${MAX_UPDATES}`,
    );
  }
}

function checkAggregation(
  options: Pick<
    ResolvedOptions,
    'aggregation' | 'byzantineCount' | 'trimFraction' | 'multiKrumSelect'
  >,
): void {
  if (!AGGREGATION_RULES.includes(options.aggregation)) {
    invalid(
      'aggregation',
      options.aggregation,
      `one of ${AGGREGATION_RULES.join(', ')}`,
    );
  }
  requireInteger('byzantineCount', options.byzantineCount, 0);
  const fraction = options.trimFraction;
  if (!(fraction >= 0 && fraction < 0.5)) {
    invalid('trimFraction', fraction, 'a number in [0, 0.5)');
  }
  requireInteger('multiKrumSelect', options.multiKrumSelect, 0);
}

function resolveTrainableTensors(layers: string[]): string[] {
  if (layers.length === 0) {
    invalid('trainableLayers', '[]', 'at least one layer name');
  }
  try {
    return tensorNamesOfLayers(layers);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option trainableLayers ${layers.join(',')}: ` +
        (err as Error).message,
    );
  }
}

function resolveProbe(options: AggregatorOptions): {
  probeImages: Float32Array;
  probeCount: number;
} {
  if (options.probeImages === undefined) {
    // Random pixels still run every operator of the graph, so they catch
    // layout and transposition bugs; real images are better when given.
    const count = 8;
    const random = createRandom(options.seed ?? 1);
    const images = new Float32Array(count * IMAGE_VALUES);
    for (let i = 0; i < images.length; i++) images[i] = random();
    return { probeImages: images, probeCount: count };
  }
  const count = options.probeCount ?? options.probeImages.length / IMAGE_VALUES;
  requireInteger('probeCount', count, 1);
  if (options.probeImages.length !== count * IMAGE_VALUES) {
    invalid(
      'probeImages',
      `${options.probeImages.length} values`,
      `${count} * ${IMAGE_VALUES} values for probeCount ${count}`,
    );
  }
  return { probeImages: options.probeImages, probeCount: count };
}

function checkTestSet(testSet: TestSet): void {
  const count = testSet.labels.length;
  if (count === 0 || testSet.images.length !== count * IMAGE_VALUES) {
    invalid(
      'testSet',
      `${testSet.images.length} image values and ${count} labels`,
      `${IMAGE_VALUES} values per label and at least one label`,
    );
  }
  const bad = testSet.labels.findIndex(
    (label) => label < 0 || label >= NUM_CLASSES,
  );
  if (bad >= 0) {
    invalid(
      `testSet.labels[${bad}]`,
      testSet.labels[bad],
      `a class id 0-${NUM_CLASSES - 1}`,
    );
  }
}

function resolveUpdateCompression(
  compression: UpdateCompression | undefined,
): UpdateCompression {
  if (compression === undefined) return NO_COMPRESSION;
  try {
    checkUpdateCompression(compression);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator option updateCompression: ${(err as Error).message}`,
      { cause: err },
    );
  }
  return { ...compression };
}
