/**
 * One simulation run: the embedded broker, the aggregator and N vehicle
 * agents in this process (see fleet-run.ts), then the centralized
 * baseline and the report. Every agent is a real MQTT client on loopback;
 * they share the CPU, so vehicles train one after another in practice.
 */
import {
  accessSync,
  constants,
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  MODEL_NAME,
  NUM_CLASSES,
  OnnxClassifier,
  predictTfjs,
  evaluateAccuracy,
  exportOnnx,
  readWeightsFile,
  selectTrainingBackend,
  tensorNamesOfLayers,
} from '../../models/index.ts';
import { ErrorCode, FleetError, type Logger } from '../../protocol/index.ts';
import type { UpdateCompression } from '../../protocol/compression/index.ts';
import type {
  AggregationRule,
  DifferentialPrivacyOptions,
  NormBoundOptions,
  SecureAggregationOptions,
  ServerOptimizerOptions,
  AsyncBufferOptions,
} from '../../aggregator/index.ts';
import type { SimAttackKind } from './attackers.ts';
import { trainCentralized } from './centralized.ts';
import { prepareFleetData, unionOf } from './data.ts';
import type { FaultKind } from './faults.ts';
import { runFleet } from './fleet-run.ts';
import { resolveSecureAggregation } from '../../aggregator/secure-options.ts';
import { formatDeliveryLine } from './ledger.ts';
import { RoundProgress } from './progress.ts';
import {
  buildReport,
  printRoundTable,
  type SimulationReport,
} from './report.ts';

const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));

/** Base model (version 0) that ships with the project. */
export const BASE_WEIGHTS_PATH = path.join(
  REPO_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);

export interface SimulationOptions {
  vehicles: number;
  rounds: number;
  dataDir?: string;
  seed: number;
  reportPath?: string;
  /** Dirichlet concentration of the per-vehicle class split. */
  alpha: number;
  localEpochs: number;
  batchSize: number;
  learningRate: number;
  proximalMu: number;
  /** Vehicles train with a softmax over their own classes only. */
  restrictToLocalClasses: boolean;
  trainLayers: string[];
  /** Default: half the vehicles, rounded up. */
  minUpdates?: number;
  roundTimeoutMs: number;
  /** Default: a new directory under `<repo>/runs/`, which git ignores. */
  stateDir?: string;
  /** Base model weights; default BASE_WEIGHTS_PATH. */
  baseWeightsPath?: string;
  /** JSON list of depot track ids; default DEPOT_TRACKS_PATH. */
  depotTracksPath?: string;
  /** Train the centralized baseline too. */
  centralized: boolean;
  /** Faults to inject; empty for a run without faults. */
  faults: FaultKind[];
  /** Share of the selected vehicles each fault kind hits per round. */
  faultRate: number;
  /**
   * Mutual TLS with the broker's ACL, signed releases and signed updates,
   * over a temporary PKI. Cannot be combined with faults.
   */
  secure: boolean;
  /** Attacker vehicles: the first `attackers` by id; 0 for none. */
  attackers: number;
  attack: SimAttackKind;
  /** Factor of boost and sign-flip; noise std in update RMS units. */
  attackScale: number;
  /** Aggregation rule and its settings, passed to the aggregator. */
  aggregation: AggregationRule;
  byzantineCount: number;
  trimFraction: number;
  /** 0 means n - f. */
  multiKrumSelect: number;
  /** DP-FedAvg settings passed to the aggregator; undefined for none. */
  differentialPrivacy?: DifferentialPrivacyOptions;
  /** Secure aggregation settings; undefined for plain updates. */
  secureAggregation?: SecureAggregationOptions;
  /** Asynchronous mode (FedBuff) settings; undefined for rounds. */
  asyncBuffer?: AsyncBufferOptions;
  /** Encoding of the vehicles' deltas; undefined for float32. */
  updateCompression?: UpdateCompression;
  /** Server optimizer of the aggregator; undefined for the plain step. */
  serverOptimizer?: ServerOptimizerOptions;
  /** Norm bound of the aggregator; undefined for none. */
  normBound?: NormBoundOptions;
  progress: boolean;
  /** Port of the aggregator's live view; undefined for none. */
  liveViewPort?: number;
  log: Logger;
}

/** Runs the simulation, prints the per-round table and writes the report. */
export async function runSimulation(
  options: SimulationOptions,
): Promise<SimulationReport> {
  const log = options.log.child({ component: 'sim' });
  const started = Date.now();
  const trainableTensors = tensorNamesOfLayers(options.trainLayers);
  if (options.secure && options.faults.length > 0) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      '--secure cannot be combined with --faults: the fault proxies ' +
        'speak plain MQTT',
    );
  }
  if (options.secureAggregation !== undefined && options.faults.length > 0) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      '--secure-aggregation cannot be combined with --faults: the fault ' +
        'kinds act on plain updates, which secure rounds do not send',
    );
  }
  if (options.attackers > options.vehicles) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `--attackers ${options.attackers} is above --vehicles ${options.vehicles}`,
    );
  }
  const minUpdates = options.minUpdates ?? Math.ceil(options.vehicles / 2);
  if (minUpdates > options.vehicles) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `--min-updates ${minUpdates} is above --vehicles ${options.vehicles}; ` +
        'the quorum could never be met',
    );
  }
  if (options.secureAggregation !== undefined) {
    // Checked before the data loads, as the aggregator would at start.
    resolveSecureAggregation(options.secureAggregation, {
      aggregation: options.aggregation,
      minUpdates,
      differentialPrivacy: options.differentialPrivacy,
      updateCompression: options.updateCompression,
    });
  }
  const stateDir =
    options.stateDir ??
    path.join(
      REPO_ROOT,
      'runs',
      `simulate-${new Date().toISOString().replace(/[:.]/g, '-')}`,
    );
  checkOutputPaths(stateDir, options.reportPath);
  log.info({ ...summarize(options), stateDir }, 'simulation started');

  const backend = await selectTrainingBackend(log);
  const data = await prepareFleetData(options, log);
  const baseWeightsPath = options.baseWeightsPath ?? BASE_WEIGHTS_PATH;
  const base = readWeightsFile(baseWeightsPath);
  const baseAccuracy = await measureAccuracy(exportOnnx(base), data.test);
  console.error(
    `data ${data.dataDir}: ${data.shares.map((s) => s.count).join('+')} ` +
      `training images on ${options.vehicles} vehicles, ${data.test.count} ` +
      `test images; base model accuracy ${baseAccuracy.toFixed(4)}; ` +
      `training backend ${backend}`,
  );

  // Created only once the inputs are known to be good, so a bad flag
  // leaves no empty run directory behind.
  mkdirSync(stateDir, { recursive: true });
  const progress = new RoundProgress(
    options.rounds,
    options.vehicles,
    options.progress,
  );
  const fleet = await runFleet({
    options,
    data,
    baseWeightsPath,
    stateDir,
    minUpdates,
    progress,
  });

  const federatedMs = Date.now() - started;
  printRoundTable(fleet.rows);
  console.error(formatDeliveryLine(fleet.delivery));

  let centralizedAccuracy: number | undefined;
  if (options.centralized) {
    console.error(
      `training the centralized baseline: ${options.rounds * options.localEpochs} epochs`,
    );
    centralizedAccuracy = await trainCentralized(
      base,
      unionOf(data.shares),
      data.test,
      {
        trainableTensors,
        epochs: options.rounds * options.localEpochs,
        batchSize: options.batchSize,
        learningRate: options.learningRate,
        seed: options.seed,
      },
      log,
      options.progress,
    );
  }

  const modelPath = path.join(
    stateDir,
    'aggregator',
    'models',
    MODEL_NAME,
    `v${fleet.modelVersion}.onnx`,
  );
  const agreement = await compareWithTfjs(
    modelPath,
    modelPath.replace(/\.onnx$/, '.weights.pb'),
    data.test,
  );
  const report = buildReport({
    top1Agreement: agreement,
    options: summarize(options),
    backend,
    baseAccuracy,
    centralizedAccuracy,
    modelPath,
    modelVersion: fleet.modelVersion,
    rows: fleet.rows,
    attackerIds: fleet.attackerIds,
    privacyBudgetSpent: fleet.privacyBudgetSpent,
    delivery: fleet.delivery,
    faults: fleet.faults,
    secure: fleet.secure,
    federatedMs,
    totalMs: Date.now() - started,
  });
  console.error(
    `base ${baseAccuracy.toFixed(4)}, final ${report.finalAccuracy?.toFixed(4) ?? 'n/a'}` +
      (centralizedAccuracy === undefined
        ? ''
        : `, centralized ${centralizedAccuracy.toFixed(4)}`) +
      `, model ${modelPath}, ${(report.totalMs / 1000).toFixed(0)} s`,
  );
  if (options.reportPath !== undefined)
    writeJsonAtomic(options.reportPath, report);
  log.info(
    { reportPath: options.reportPath, durationMs: report.totalMs },
    'simulation finished',
  );
  return report;
}

/**
 * Returns the share of test images on which the final ONNX model and
 * TF.js, run on the same weights, pick the same top-1 class.
 */
async function compareWithTfjs(
  onnxPath: string,
  weightsPath: string,
  test: { images: Float32Array; count: number },
): Promise<number> {
  const classifier = await OnnxClassifier.create(readFileSync(onnxPath));
  const onnxProbabilities = await classifier.predict(test.images, test.count);
  await classifier.close();
  const tfjsProbabilities = await predictTfjs(
    readWeightsFile(weightsPath),
    test.images,
    test.count,
  );
  let same = 0;
  for (let i = 0; i < test.count; i++) {
    const offset = i * NUM_CLASSES;
    const onnxTop = argMax(
      onnxProbabilities.subarray(offset, offset + NUM_CLASSES),
    );
    const tfjsTop = argMax(
      tfjsProbabilities.subarray(offset, offset + NUM_CLASSES),
    );
    if (onnxTop === tfjsTop) same += 1;
  }
  return same / test.count;
}

function argMax(values: Float32Array): number {
  let best = 0;
  for (let i = 1; i < values.length; i++)
    if (values[i] > values[best]) best = i;
  return best;
}

async function measureAccuracy(
  onnx: Uint8Array,
  test: { images: Float32Array; labels: Int32Array },
): Promise<number> {
  const classifier = await OnnxClassifier.create(onnx);
  try {
    return await evaluateAccuracy(classifier, test.images, test.labels);
  } finally {
    await classifier.close();
  }
}

function summarize(options: SimulationOptions): Record<string, unknown> {
  const { log: _log, ...rest } = options;
  return rest;
}

function writeJsonAtomic(file: string, value: unknown): void {
  const temp = `${file}.${process.pid}.tmp`;
  writeFileSync(temp, JSON.stringify(value, null, 2) + '\n');
  renameSync(temp, file);
}

/**
 * Checks before the run that the state directory can be created and the
 * report written, so that a typo does not cost a whole simulation.
 *
 * @throws {FleetError} INVALID_CONFIG naming the path and the problem.
 */
function checkOutputPaths(
  stateDir: string,
  reportPath: string | undefined,
): void {
  if (existsSync(stateDir) && !statSync(stateDir).isDirectory()) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `--state-dir ${stateDir} is a file, expected a directory`,
    );
  }
  if (reportPath === undefined) return;
  const reportDir = path.dirname(path.resolve(reportPath));
  try {
    accessSync(reportDir, constants.W_OK);
  } catch {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `--report ${reportPath}: directory ${reportDir} does not exist or ` +
        'is not writable; create it first',
    );
  }
}
