/**
 * Model versions of the aggregator: version 0 from the base weights, and
 * each later version from the previous one plus a round's mean delta.
 */
import { existsSync, mkdirSync } from 'node:fs';
import { ErrorCode, FleetError, type Logger } from '../protocol/index.ts';
import { MODEL_NAME, type WeightMap } from '../models/architecture.ts';
import { readWeightsFile } from '../models/weights-file.ts';
import { applyDeltas } from '../models/index.ts';
import {
  describeStrategy,
  measureReleaseLatency,
} from '../models/registry/index.ts';
import { checkWeights, exportAndCheck } from './model-check.ts';
import type { ModelStore, StoredModel } from './model-store.ts';
import type { ResolvedOptions } from './options.ts';
import {
  aggregateKrum,
  aggregateMedian,
  aggregateMultiKrum,
  aggregateTrimmedMean,
  type VehicleUpdate,
} from './strategies/index.ts';
import { averageUpdates } from './round-norm-bound.ts';
import type { ServerStep } from './server-step.ts';
import { encodeRelease } from './release-messages.ts';
import type { OpenRound, RoundStats } from './round.ts';
import { loadState, saveState, type AggregatorState } from './state.ts';

function checkOptionsOf(options: ResolvedOptions, docString: string) {
  return {
    probeImages: options.probeImages,
    probeCount: options.probeCount,
    toleranceAbs: options.exportToleranceAbs,
    testSet: options.testSet,
    docString,
  };
}

/**
 * Loads state.json and the current model version from the store. A new
 * state directory starts at version 0, exported from the base weights.
 *
 * @throws {FleetError} INVALID_CONFIG for a missing base weights file or
 *   bad state.json, INVALID_MODEL for a missing or corrupt stored version,
 *   EXPORT_MISMATCH when version 0 does not export faithfully.
 */
export async function loadCurrentModel(
  options: ResolvedOptions,
  store: ModelStore,
  log: Logger,
): Promise<{ state: AggregatorState; model: StoredModel }> {
  mkdirSync(options.stateDir, { recursive: true });
  const state = loadState(options.stateDir) ?? { round: 0, modelVersion: 0 };

  let model: StoredModel;
  if (store.has(state.modelVersion)) {
    model = store.load(state.modelVersion);
    checkWeights(model.weights, store.pathOf(state.modelVersion, 'weights.pb'));
  } else if (state.modelVersion === 0) {
    model = await createBaseVersion(options, log);
    store.save(model);
  } else {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `state.json names model version ${state.modelVersion}, but ` +
        `${store.pathOf(state.modelVersion, 'json')} does not exist`,
    );
  }
  saveState(options.stateDir, state);
  return { state, model };
}

async function createBaseVersion(
  options: ResolvedOptions,
  log: Logger,
): Promise<StoredModel> {
  const path = options.baseWeightsPath;
  if (!existsSync(path)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `base weights file ${path} not found; pass the path of a ModelWeights ` +
        'file (scripts/train-base-model.ts writes one)',
    );
  }
  const weights = readWeightsFile(path);
  checkWeights(weights, path);

  const checked = await exportAndCheck(
    weights,
    checkOptionsOf(options, `${MODEL_NAME} version 0`),
  );
  log.info(
    { modelVersion: 0, path, maxAbsDiff: checked.maxAbsDiff },
    'base model exported',
  );
  return {
    weights,
    onnx: checked.onnx,
    manifest: {
      modelName: MODEL_NAME,
      version: 0,
      parentVersion: 0,
      round: 0,
      numVehicles: 0,
      numExamples: 0,
      testAccuracy: checked.testAccuracy ?? null,
      sha256: checked.sha256,
      sizeBytes: checked.onnx.byteLength,
      createdAt: new Date().toISOString(),
      createdAtMs: Date.now(),
      trainableTensors: [],
      strategy: 'base',
      latency: await measureReleaseLatency(checked.onnx, options),
    },
  };
}

/**
 * Builds model `version` from `current` (its parent): the parent's weights
 * plus `meanDelta`, or `nextWeights` when a server optimizer computed
 * them, exported and checked against TF.js. Nothing is stored here.
 *
 * @throws {FleetError} NON_FINITE_VALUE when a merged weight is NaN or
 *   infinite, EXPORT_MISMATCH when ONNX and TF.js disagree.
 */
export async function buildNextVersion(
  current: StoredModel,
  version: number,
  meanDelta: WeightMap,
  stats: RoundStats,
  options: ResolvedOptions,
  nextWeights?: WeightMap,
): Promise<{ model: StoredModel; maxAbsDiff: number }> {
  const weights = nextWeights ?? applyDeltas(current.weights, meanDelta);
  checkFinite(weights, version);
  const checked = await exportAndCheck(
    weights,
    checkOptionsOf(options, `${MODEL_NAME} version ${version}`),
  );
  const createdAtMs = Date.now();
  const model: StoredModel = {
    weights,
    onnx: checked.onnx,
    manifest: {
      modelName: MODEL_NAME,
      version,
      parentVersion: current.manifest.version,
      round: stats.round,
      numVehicles: stats.numVehicles,
      numExamples: stats.numExamples,
      testAccuracy: checked.testAccuracy ?? null,
      sha256: checked.sha256,
      sizeBytes: checked.onnx.byteLength,
      createdAt: new Date(createdAtMs).toISOString(),
      createdAtMs,
      trainableTensors: [...options.trainableTensors],
      ...describeStrategy(options),
      latency: await measureReleaseLatency(checked.onnx, options),
    },
  };
  return { model, maxAbsDiff: checked.maxAbsDiff };
}

/**
 * Checks that every merged weight is finite. Without this, an overflow
 * would surface later as a NaN difference in the export check.
 *
 * @throws {FleetError} NON_FINITE_VALUE naming the first bad weight.
 */
export function checkFinite(weights: WeightMap, version: number): void {
  for (const [name, values] of weights) {
    const bad = values.findIndex((value) => !Number.isFinite(value));
    if (bad >= 0) {
      throw new FleetError(
        ErrorCode.NonFiniteValue,
        `merged weights of version ${version} have value ${values[bad]} ` +
          `in tensor ${name} at index ${bad}; expected finite numbers, so ` +
          'the round is discarded',
      );
    }
  }
}

/**
 * Returns the round's mean delta under `options.aggregation`: the
 * streamed FedAvg mean, or a robust rule over the round's kept updates.
 * With `differentialPrivacy` it is the DP-FedAvg mean instead: the
 * clipped equal-weight sum plus Gaussian noise, divided by the number of
 * selected vehicles. `boundedUpdates`, the round's updates after the norm
 * bound, replace the streamed mean and the kept updates.
 *
 * @throws {FleetError} ROBUST_RULE_UNSATISFIED when the number of updates
 *   breaks the rule's requirement (for example Krum needs n > 2f + 2).
 * @throws {Error} for a robust rule on a round that kept no updates.
 */
export function computeMeanDelta(
  round: OpenRound,
  options: Pick<
    ResolvedOptions,
    | 'aggregation'
    | 'byzantineCount'
    | 'trimFraction'
    | 'multiKrumSelect'
    | 'differentialPrivacy'
  >,
  boundedUpdates?: readonly VehicleUpdate[],
): WeightMap {
  const { aggregation, byzantineCount, differentialPrivacy } = options;
  // A secure round's mean was computed when it was unmasked.
  if (round.secureMean !== undefined) return round.secureMean;
  if (differentialPrivacy !== undefined) {
    const sum = round.clippedSum;
    if (sum === undefined) {
      throw new Error(
        `round ${round.round} has no clipped sum, which differential ` +
          'privacy needs; open it with clipNorm',
      );
    }
    return sum.noisyMean(round.selected.size, differentialPrivacy, round.round);
  }
  if (aggregation === 'fedavg') {
    return boundedUpdates === undefined
      ? round.fedAvgMean()
      : averageUpdates(boundedUpdates);
  }
  const updates = boundedUpdates ?? round.keptUpdates;
  if (updates === undefined) {
    throw new Error(
      `round ${round.round} kept no updates, which aggregation ` +
        `${aggregation} needs; open it with keepUpdates`,
    );
  }
  switch (aggregation) {
    case 'median':
      return aggregateMedian(updates, { byzantineCount });
    case 'trimmed-mean':
      return aggregateTrimmedMean(updates, {
        trimFraction: options.trimFraction,
      }).deltas;
    case 'krum':
      return aggregateKrum(updates, { byzantineCount }).deltas;
    case 'multi-krum': {
      const selectCount =
        options.multiKrumSelect > 0
          ? options.multiKrumSelect
          : Math.max(1, updates.length - byzantineCount);
      return aggregateMultiKrum(updates, { byzantineCount, selectCount })
        .deltas;
    }
  }
}

/** A new version, stored and recorded in state.json, not yet published. */
export interface CommittedVersion {
  model: StoredModel;
  /** Encoded release notice (ModelRelease) of the version. */
  release: Uint8Array;
  exportMaxAbsDiff: number;
}

/**
 * Turns a closed round into the next model version: checks the quorum,
 * adds the mean delta of `options.aggregation` (see
 * computeMeanDelta), exports and checks the ONNX model, stores it, then updates state.json. Nothing is written when a step fails. The
 * version number follows the highest one stored, so after a rollback the
 * numbers of withdrawn versions are not reused.
 *
 * @throws {FleetError} QUORUM_NOT_MET, ROBUST_RULE_UNSATISFIED,
 *   NON_FINITE_VALUE (merged weights),
 *   EXPORT_MISMATCH, or PAYLOAD_TOO_LARGE when the release notice exceeds
 *   maxMessageBytes.
 */
export async function commitRound(
  round: OpenRound,
  current: StoredModel,
  store: ModelStore,
  options: ResolvedOptions,
  steps: {
    /** Updates after the norm bound (see computeMeanDelta). */
    boundedUpdates?: readonly VehicleUpdate[];
    /**
     * Turns the mean delta into the weights' step; its moments are saved
     * only once the version is stored.
     */
    serverStep?: ServerStep;
  } = {},
): Promise<CommittedVersion> {
  const stats = round.stats();
  if (stats.accepted < options.minUpdates) {
    throw new FleetError(
      ErrorCode.QuorumNotMet,
      `round ${stats.round} closed with ${stats.accepted} accepted ` +
        `updates, below the quorum of ${options.minUpdates}`,
    );
  }

  const mean = computeMeanDelta(round, options, steps.boundedUpdates);
  const proposed = steps.serverStep?.propose(current.weights, mean);
  const version =
    Math.max(store.highestVersion(), current.manifest.version) + 1;
  const { model, maxAbsDiff } = await buildNextVersion(
    current,
    version,
    mean,
    stats,
    options,
    proposed?.weights,
  );
  const { notice } = encodeRelease(
    model.manifest,
    model.onnx,
    options.maxMessageBytes,
  );

  store.save(model);
  // Before state.json: a crash in between leaves moments of an unused
  // version, which ServerStep.open resets.
  proposed?.commit(model.manifest.version);
  saveState(options.stateDir, {
    round: stats.round,
    modelVersion: model.manifest.version,
  });
  return { model, release: notice, exportMaxAbsDiff: maxAbsDiff };
}
