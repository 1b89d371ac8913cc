/**
 * Local training for one round: features from the frozen prefix, the
 * suffix trained from exactly the announced model version, and the
 * resulting ModelUpdate.
 */
import { createHash, randomUUID } from 'node:crypto';
import {
  LAYER_NAMES,
  TENSOR_SPECS,
  type WeightMap,
} from '../models/architecture.ts';
import type { TrainingBackend } from '../models/backend.ts';
import type { LabelledImages } from '../models/index.ts';
import { createRandom, sampleNormal } from '../models/random.ts';
import {
  firstTrainableLayer,
  trainLocal,
  type LocalTrainingResult,
} from '../models/training.ts';
import {
  ErrorCode,
  FleetError,
  encodeFloat32Tensor,
  encodeModelUpdate,
  encodeSignedUpdate,
  type ModelUpdate,
  type RoundTask,
  type SigningKey,
  type TrainingConfig,
} from '../protocol/index.ts';
import type { DeployedModel } from './deployment.ts';
import type { FeatureCache } from './feature-cache.ts';

const SHAPES = new Map(TENSOR_SPECS.map((spec) => [spec.name, spec.shape]));

/** Kinds of UpdateAttack. */
export const ATTACK_KINDS = ['boost', 'sign-flip', 'noise'] as const;

/**
 * A poisoned update, for simulation and testing only: it lets a test
 * fleet measure what the robust aggregation rules withstand. 'boost'
 * multiplies the deltas by `scale`, 'sign-flip' by -scale, and 'noise'
 * replaces them with seeded Gaussian noise of standard deviation
 * scale x the honest update's root mean square.
 */
export interface UpdateAttack {
  kind: (typeof ATTACK_KINDS)[number];
  /** Positive factor; see `kind`. */
  scale: number;
}

/**
 * Attacked values are clamped to this, the aggregator's default
 * maxAbsDeltaValue, so that the aggregator accepts them.
 */
export const ATTACK_MAX_ABS = 1000;

/**
 * Returns new deltas with `attack` applied to `deltas`; see UpdateAttack.
 * Values are clamped to +-ATTACK_MAX_ABS. The noise is seeded by `seed`.
 *
 * @throws {RangeError} for an unknown kind or a scale that is not a
 *   positive finite number.
 */
export function applyAttack(
  deltas: ReadonlyMap<string, Float32Array>,
  attack: UpdateAttack,
  seed: number,
): WeightMap {
  checkAttack(attack);
  const { kind, scale } = attack;
  let factor = kind === 'sign-flip' ? -scale : scale;
  let random: (() => number) | undefined;
  if (kind === 'noise') {
    factor = scale * rootMeanSquare(deltas);
    random = createRandom(seed);
  }
  const clamp = (value: number) =>
    Math.max(-ATTACK_MAX_ABS, Math.min(ATTACK_MAX_ABS, value));
  const attacked: WeightMap = new Map();
  for (const [name, values] of deltas) {
    const out = new Float32Array(values.length);
    for (let i = 0; i < values.length; i++) {
      const base = random === undefined ? values[i] : sampleNormal(random);
      out[i] = clamp(base * factor);
    }
    attacked.set(name, out);
  }
  return attacked;
}

/** Throws RangeError unless `attack` is a known kind with a usable scale. */
export function checkAttack(attack: UpdateAttack): void {
  if (!ATTACK_KINDS.includes(attack.kind)) {
    throw new RangeError(
      `attack kind ${String(attack.kind)} is unknown, expected one of ` +
        ATTACK_KINDS.join(', '),
    );
  }
  if (!(attack.scale > 0) || !Number.isFinite(attack.scale)) {
    throw new RangeError(
      `attack scale ${attack.scale} must be a positive finite number`,
    );
  }
}

function rootMeanSquare(deltas: ReadonlyMap<string, Float32Array>): number {
  let sum = 0;
  let count = 0;
  for (const values of deltas.values()) {
    for (const value of values) sum += value * value;
    count += values.length;
  }
  return count === 0 ? 0 : Math.sqrt(sum / count);
}

/**
 * Checks a round's training config before any work starts.
 *
 * @throws {FleetError} WRONG_TENSORS for an empty, unknown or repeated
 *   tensor name, INVALID_CONFIG for hyperparameters out of range.
 */
export function checkTrainingConfig(config: TrainingConfig): void {
  const names = config.trainableTensors;
  const unknown = names.filter((name) => !SHAPES.has(name));
  if (names.length === 0 || unknown.length > 0) {
    throw new FleetError(
      ErrorCode.WrongTensors,
      `trainable tensors [${names.join(', ')}] are empty or name tensors ` +
        `the model lacks (${unknown.join(', ')})`,
    );
  }
  if (new Set(names).size !== names.length) {
    throw new FleetError(
      ErrorCode.WrongTensors,
      `trainable tensors [${names.join(', ')}] repeat a name`,
    );
  }
  const valid =
    Number.isInteger(config.localEpochs) &&
    config.localEpochs >= 1 &&
    Number.isInteger(config.batchSize) &&
    config.batchSize >= 1 &&
    Number.isFinite(config.learningRate) &&
    config.learningRate > 0 &&
    Number.isFinite(config.proximalMu) &&
    config.proximalMu >= 0;
  if (!valid) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `training config has localEpochs ${config.localEpochs}, batchSize ` +
        `${config.batchSize}, learningRate ${config.learningRate}, ` +
        `proximalMu ${config.proximalMu}; expected epochs and batch size ` +
        '>= 1, learning rate > 0 and mu >= 0',
    );
  }
}

/**
 * Derives the training seed of one vehicle and round, so that vehicles
 * shuffle differently and a repeated run trains the same way.
 */
export function deriveTrainingSeed(
  baseSeed: number,
  vehicleId: string,
  round: number,
): number {
  const digest = createHash('sha256')
    .update(`${baseSeed}\0${vehicleId}\0${round}`)
    .digest();
  return digest.readUInt32LE(0);
}

/** Inputs of one round's local training. */
export interface RoundTrainingInput {
  task: RoundTask;
  /** The deployed model whose version and digest the task names. */
  model: DeployedModel;
  frames: LabelledImages;
  featureCache: FeatureCache;
  vehicleId: string;
  baseSeed: number;
  backend: TrainingBackend;
  maxMessageBytes: number;
  /** Signs the update; undefined sends it unsigned. */
  signingKey?: SigningKey;
  /** Poisons the update before encoding; simulation and testing only. */
  attack?: UpdateAttack;
  /** Aborts training after the current step; the call then rejects. */
  signal?: AbortSignal;
}

/** A trained, encoded update ready to publish. */
export interface RoundTrainingOutput {
  update: ModelUpdate;
  payload: Uint8Array;
  result: LocalTrainingResult;
  /** First trained layer; the layers before it ran in onnxruntime. */
  fromLayer: string;
}

async function trainingInputs(
  input: RoundTrainingInput,
  fromLayer: string,
): Promise<Float32Array> {
  const { frames, model } = input;
  if (fromLayer === LAYER_NAMES[0]) return frames.images;
  const cached = await input.featureCache.get(
    model.weights,
    fromLayer,
    frames.images,
    frames.count,
  );
  return cached.features;
}

/**
 * Trains the task's tensors from `model` and encodes the update.
 *
 * @throws {FleetError} NON_FINITE_VALUE when training produced NaN or
 *   infinity, PAYLOAD_TOO_LARGE when the update exceeds `maxMessageBytes`.
 * @throws the abort reason of `input.signal` once it aborts.
 */
export async function trainForRound(
  input: RoundTrainingInput,
): Promise<RoundTrainingOutput> {
  const { task, model, frames } = input;
  const config = task.training;
  checkTrainingConfig(config);
  const fromLayer = firstTrainableLayer(config.trainableTensors);
  const { signal } = input;

  signal?.throwIfAborted();
  const inputs = await trainingInputs(input, fromLayer);
  signal?.throwIfAborted();
  const seed = deriveTrainingSeed(input.baseSeed, input.vehicleId, task.round);
  const result = await trainLocal(model.weights, inputs, frames.labels, {
    trainableTensors: config.trainableTensors,
    epochs: config.localEpochs,
    batchSize: config.batchSize,
    learningRate: config.learningRate,
    proximalMu: config.proximalMu,
    restrictToLocalClasses: config.restrictToLocalClasses,
    seed,
    fromLayer: fromLayer === LAYER_NAMES[0] ? undefined : fromLayer,
    // trainLocal calls this after every step and passes the throw on.
    onProgress:
      signal === undefined ? undefined : () => signal.throwIfAborted(),
  });

  const sent =
    input.attack === undefined
      ? result
      : { ...result, deltas: applyAttack(result.deltas, input.attack, seed) };
  const update = buildModelUpdate(input, sent);
  const payload = encodeUpdatePayload(
    update,
    input.maxMessageBytes,
    input.signingKey,
  );
  return { update, payload, result, fromLayer };
}

/**
 * Encodes `update` for the update topic: inside a SignedUpdate when
 * `signingKey` is given, else bare.
 *
 * @throws {FleetError} PAYLOAD_TOO_LARGE when the payload exceeds
 *   `maxMessageBytes`.
 */
export function encodeUpdatePayload(
  update: ModelUpdate,
  maxMessageBytes: number,
  signingKey?: SigningKey,
): Uint8Array {
  const bytes = encodeModelUpdate(update, maxMessageBytes);
  if (signingKey === undefined) return bytes;
  const envelope = signingKey.envelope('update', bytes);
  return encodeSignedUpdate(envelope, maxMessageBytes);
}

/**
 * Builds the ModelUpdate of a training result: one float32 delta per
 * trainable tensor, in the task's order.
 *
 * @throws {FleetError} WRONG_TENSORS when a delta is missing,
 *   NON_FINITE_VALUE when one contains NaN or infinity.
 */
export function buildModelUpdate(
  input: Pick<RoundTrainingInput, 'task' | 'vehicleId' | 'backend'>,
  result: LocalTrainingResult,
): ModelUpdate {
  const { task } = input;
  const deltas = task.training.trainableTensors.map((name) => {
    const values = result.deltas.get(name);
    if (values === undefined) {
      throw new FleetError(
        ErrorCode.WrongTensors,
        `training returned no delta for tensor ${name}`,
      );
    }
    if (!values.every(Number.isFinite)) {
      throw new FleetError(
        ErrorCode.NonFiniteValue,
        `delta of tensor ${name} contains NaN or infinity after round ` +
          `${task.round}; the update is not sent`,
      );
    }
    return encodeFloat32Tensor(name, SHAPES.get(name)!, values);
  });

  return {
    updateId: randomUUID(),
    vehicleId: input.vehicleId,
    modelName: task.modelName,
    baseModelVersion: task.modelVersion,
    round: task.round,
    numExamples: result.numExamples,
    deltas,
    metrics: {
      trainLoss: result.loss,
      trainAccuracy: result.accuracy,
      trainDurationMs: Math.round(result.durationMs),
      backend: input.backend,
    },
    createdAtMs: Date.now(),
  };
}
