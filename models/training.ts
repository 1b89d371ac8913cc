/**
 * Local training with TF.js: fine-tunes a suffix of the model on one
 * vehicle's examples and returns the change of each trained tensor, which
 * is what a vehicle sends as its update.
 */
import * as tf from '@tensorflow/tfjs';

import {
  LAYERS,
  NUM_CLASSES,
  TENSOR_SPECS,
  type WeightMap,
} from './architecture.ts';
import {
  currentTrainingBackend,
  hasConvKernelGradient,
  selectTrainingBackend,
} from './backend.ts';
import {
  forwardBetween,
  forwardLogits,
  type ConvImpl,
  type TensorMap,
} from './forward.ts';
import { toTensors } from './predict.ts';
import { createRandom, shuffleInPlace } from './random.ts';
import {
  checkExamples,
  checkFromLayer,
  checkOptions,
  checkTensorNames,
  checkWeights,
  countValues,
  LAYER_INDEX,
  layerIndexOf,
  layerInputShape,
  SHAPES,
} from './training-checks.ts';

export { predictTfjs } from './predict.ts';

export interface LocalTrainingOptions {
  /** Tensor names to train; the rest stay frozen. */
  trainableTensors: string[];
  /** Passes over the examples, an integer >= 1. */
  epochs: number;
  /** Examples per step, an integer >= 1; the last batch may be smaller. */
  batchSize: number;
  /** Step size of the optimizer, finite and > 0. */
  learningRate: number;
  /** FedProx coefficient mu >= 0 of mu/2 * ||w - w_base||^2; 0 = off. */
  proximalMu: number;
  /** Seed of the per-epoch shuffles, a safe integer. */
  seed: number;
}

/**
 * Optimizer of trainLocal. "adam" (default; beta1 0.9, beta2 0.999,
 * epsilon 1e-7) restarts with zero moments on every call, so nothing but
 * the weights carries over between rounds. "sgd-momentum" uses momentum 0.9.
 */
export type LocalOptimizer = 'adam' | 'sgd-momentum';

export interface TrainLocalOptions extends LocalTrainingOptions {
  /**
   * When given, `inputs` are the activations this layer receives (cached
   * features, for example [N, 1024] for dense1), not images. It must not
   * come after the first trainable layer.
   */
  fromLayer?: string;
  optimizer?: LocalOptimizer;
  /**
   * Restricts the softmax to the classes present in `labels` (a
   * "restricted softmax"). With
   * label-skewed vehicles, plain cross-entropy pushes down the logits of
   * every class missing from a vehicle's examples, and averaging those updates drags the
   * global model away from them. Default false.
   */
  restrictToLocalClasses?: boolean;
  /** Called after each step, for progress bars. */
  onProgress?: (progress: TrainingProgress) => void;
  /**
   * Changes each batch of training inputs in place before its step, for
   * data augmentation; `count` is the batch size. The inputs are those of
   * the first trainable layer, so images only when conv1 trains.
   */
  augment?: (inputs: Float32Array, count: number) => void;
}

export interface TrainingProgress {
  /** Current epoch, counted from 0. */
  epoch: number;
  /** Examples done in the current epoch. */
  examplesDone: number;
  numExamples: number;
}

export interface LocalTrainingResult {
  /** Trained minus base values, for exactly the trainable tensors. */
  deltas: WeightMap;
  /** Mean softmax cross-entropy over the last epoch's steps (no FedProx term). */
  loss: number;
  /** Top-1 accuracy on the training batches of the last epoch. */
  accuracy: number;
  durationMs: number;
  numExamples: number;
}

const MOMENTUM = 0.9;
/** Examples per forward pass of the frozen prefix. */
const PREFIX_BATCH_SIZE = 256;
/**
 * Maximum time between yields to the event loop during training, so that
 * timers (MQTT keepalive, progress bars) still fire while the synchronous
 * wasm and cpu backends train.
 */
const YIELD_INTERVAL_MS = 50;
let lastYield = performance.now();

/** Yields to the event loop when `intervalMs` passed since the last yield. */
async function yieldEvery(intervalMs: number): Promise<void> {
  if (performance.now() - lastYield < intervalMs) return;
  await new Promise((resolve) => setImmediate(resolve));
  lastYield = performance.now();
}

/**
 * Returns the earliest layer (in model order) that owns one of
 * `trainableTensors`.
 *
 * @throws {TypeError} when `trainableTensors` is not an array of strings.
 * @throws {RangeError} when it is empty or names an unknown tensor.
 */
export function firstTrainableLayer(trainableTensors: string[]): string {
  checkTensorNames(trainableTensors);
  const first = Math.min(...trainableTensors.map(layerIndexOf));
  return LAYERS[first].name;
}

/**
 * Trains `trainableTensors` of `base` on the examples and returns their
 * deltas. Training starts at the first trainable layer. Frozen layers
 * before it run once over all examples (native convolutions), and the
 * steps run from there with softmax cross-entropy plus the optional FedProx
 * term. Trainable convolutions use tf.conv2d where the backend has its
 * kernel gradient and "custom-grad" convolutions elsewhere (wasm). Runs on
 * the backend selectTrainingBackend chose, selecting one first if none was.
 *
 * @param inputs images NHWC [N, 32, 32, 3] in [0, 1], or with `fromLayer`
 *   that layer's input activations, flattened per example.
 * @param labels class ids 0..42, one per example.
 * @throws {TypeError} for arguments of the wrong type.
 * @throws {RangeError} for out-of-range options, unknown or missing
 *   tensors, labels outside 0..42, or an `inputs` length that does not
 *   match `labels`.
 */
export async function trainLocal(
  base: WeightMap,
  inputs: Float32Array,
  labels: Int32Array,
  options: TrainLocalOptions,
): Promise<LocalTrainingResult> {
  const started = performance.now();
  const plan = planTraining(base, inputs, labels, options);
  if (currentTrainingBackend() === undefined) await selectTrainingBackend();

  const features = await computeFrozenPrefix(base, inputs, plan);
  const convImpl = chooseConvImpl(options.trainableTensors);
  const state = createTrainingState(base, plan, options, labels);
  try {
    let lastEpoch = { loss: NaN, accuracy: NaN };
    for (let epoch = 0; epoch < options.epochs; epoch++) {
      lastEpoch = await runEpoch(
        state,
        features,
        labels,
        plan,
        convImpl,
        (done) =>
          options.onProgress?.({
            epoch,
            examplesDone: done,
            numExamples: labels.length,
          }),
      );
    }
    const deltas = await readDeltas(state, base);
    return {
      deltas,
      loss: lastEpoch.loss,
      accuracy: lastEpoch.accuracy,
      durationMs: performance.now() - started,
      numExamples: labels.length,
    };
  } finally {
    disposeTrainingState(state);
  }
}

/** Layer range and example count of one trainLocal call, from checked arguments. */
interface TrainingPlan {
  /** Index of the layer whose input `inputs` holds. */
  inputLayer: number;
  /** Index of the first trainable layer. */
  firstLayer: number;
  numExamples: number;
}

function planTraining(
  base: WeightMap,
  inputs: Float32Array,
  labels: Int32Array,
  options: TrainLocalOptions,
): TrainingPlan {
  checkOptions(options);
  const firstLayer = LAYER_INDEX.get(
    firstTrainableLayer(options.trainableTensors),
  )!;
  const inputLayer =
    options.fromLayer === undefined ? 0 : checkFromLayer(options.fromLayer);
  if (inputLayer > firstLayer) {
    throw new RangeError(
      `fromLayer ${options.fromLayer} comes after the first trainable layer ` +
        `${LAYERS[firstLayer].name}; expected ${LAYERS[firstLayer].name} or ` +
        `an earlier layer`,
    );
  }
  checkWeights(base, inputLayer);
  checkExamples(inputs, labels, inputLayer);
  return { inputLayer, firstLayer, numExamples: labels.length };
}

/** Tensors alive during training, all disposed at the end. */
interface TrainingState {
  variables: Map<string, tf.Variable>;
  /** Frozen and trainable tensors of the layers that run in each step. */
  weights: TensorMap;
  frozen: tf.Tensor[];
  /** Base values of the trainable tensors, for the FedProx term. */
  anchors: Map<string, tf.Tensor>;
  optimizer: tf.Optimizer;
  proximalMu: number;
  batchSize: number;
  random: () => number;
  fromLayer: string;
  augment?: (inputs: Float32Array, count: number) => void;
  /** Added to the logits in the loss: 0 for local classes, -1e9 otherwise. */
  classMask?: tf.Tensor1D;
}

function createClassMask(labels: Int32Array): tf.Tensor1D {
  const mask = new Float32Array(NUM_CLASSES).fill(-1e9);
  for (const label of labels) mask[label] = 0;
  return tf.tensor1d(mask, 'float32');
}

function createTrainingState(
  base: WeightMap,
  plan: TrainingPlan,
  options: TrainLocalOptions,
  labels: Int32Array,
): TrainingState {
  const names = TENSOR_SPECS.map((spec) => spec.name).filter(
    (name) => layerIndexOf(name) >= plan.firstLayer,
  );
  const trainable = new Set(options.trainableTensors);
  const variables = new Map<string, tf.Variable>();
  const weights: TensorMap = new Map();
  const frozen: tf.Tensor[] = [];
  const anchors = new Map<string, tf.Tensor>();
  for (const name of names) {
    const tensor = tf.tensor(base.get(name)!, SHAPES.get(name)!, 'float32');
    if (!trainable.has(name)) {
      frozen.push(tensor);
      weights.set(name, tensor);
      continue;
    }
    const variable = tf.variable(tensor, true);
    variables.set(name, variable);
    weights.set(name, variable);
    if (options.proximalMu > 0) anchors.set(name, tensor);
    else tensor.dispose();
  }

  return {
    variables,
    weights,
    frozen,
    anchors,
    optimizer: createOptimizer(
      options.optimizer ?? 'adam',
      options.learningRate,
    ),
    proximalMu: options.proximalMu,
    batchSize: options.batchSize,
    random: createRandom(options.seed),
    fromLayer: LAYERS[plan.firstLayer].name,
    augment: options.augment,
    classMask:
      options.restrictToLocalClasses === true
        ? createClassMask(labels)
        : undefined,
  };
}

function disposeTrainingState(state: TrainingState): void {
  state.optimizer.dispose();
  tf.dispose([...state.variables.values()]);
  tf.dispose(state.frozen);
  tf.dispose([...state.anchors.values()]);
  state.classMask?.dispose();
}

function createOptimizer(
  name: LocalOptimizer,
  learningRate: number,
): tf.Optimizer {
  return name === 'adam'
    ? tf.train.adam(learningRate)
    : tf.train.momentum(learningRate, MOMENTUM);
}

function chooseConvImpl(trainableTensors: string[]): ConvImpl {
  const trainsConv = trainableTensors.some(
    (name) => LAYERS[layerIndexOf(name)].kind === 'conv',
  );
  return trainsConv && !hasConvKernelGradient() ? 'custom-grad' : 'native';
}

/**
 * Runs the frozen layers between the input layer and the first trainable
 * layer once over all examples, so that epochs do not repeat them.
 */
async function computeFrozenPrefix(
  base: WeightMap,
  inputs: Float32Array,
  plan: TrainingPlan,
): Promise<Float32Array> {
  if (plan.inputLayer === plan.firstLayer) return inputs;
  const names = TENSOR_SPECS.map((spec) => spec.name).filter((name) => {
    const index = layerIndexOf(name);
    return index >= plan.inputLayer && index < plan.firstLayer;
  });
  const tensors = toTensors(base, names);
  const inputShape = layerInputShape(plan.inputLayer);
  const inputSize = countValues(inputShape);
  const outputSize = countValues(layerInputShape(plan.firstLayer));
  const features = new Float32Array(plan.numExamples * outputSize);
  try {
    for (let start = 0; start < plan.numExamples; start += PREFIX_BATCH_SIZE) {
      const size = Math.min(PREFIX_BATCH_SIZE, plan.numExamples - start);
      const batch = inputs.subarray(
        start * inputSize,
        (start + size) * inputSize,
      );
      const output = tf.tidy(() =>
        forwardBetween(
          tensors,
          tf.tensor(batch, [size, ...inputShape], 'float32'),
          LAYERS[plan.inputLayer].name,
          LAYERS[plan.firstLayer].name,
        ),
      );
      features.set(await output.data(), start * outputSize);
      output.dispose();
    }
  } finally {
    tf.dispose([...tensors.values()]);
  }
  return features;
}

/** One pass over the examples in a seeded order; returns its mean metrics. */
async function runEpoch(
  state: TrainingState,
  features: Float32Array,
  labels: Int32Array,
  plan: TrainingPlan,
  convImpl: ConvImpl,
  onStep: (examplesDone: number) => void,
): Promise<{ loss: number; accuracy: number }> {
  const order = shuffleInPlace(
    Array.from({ length: plan.numExamples }, (_, i) => i),
    state.random,
  );
  const inputShape = layerInputShape(plan.firstLayer);
  const exampleSize = countValues(inputShape);
  // [sum of loss * batch size, number correct], kept on the backend so
  // that steps do not wait for each other.
  let totals: tf.Tensor1D = tf.zeros([2]);
  let lossSum: number;
  let correct: number;
  // onStep may throw to abort training, so `totals` is freed in finally.
  try {
    for (let start = 0; start < order.length; start += state.batchSize) {
      const indices = order.slice(start, start + state.batchSize);
      const batch = gatherBatch(features, labels, indices, exampleSize);
      state.augment?.(batch.inputs, indices.length);
      const stepTotals = runStep(
        state,
        batch,
        [indices.length, ...inputShape],
        convImpl,
      );
      const next = tf.add(totals, stepTotals) as tf.Tensor1D;
      tf.dispose([totals, stepTotals]);
      totals = next;
      onStep(start + indices.length);
      await yieldEvery(YIELD_INTERVAL_MS);
    }
    [lossSum, correct] = await totals.data();
  } finally {
    totals.dispose();
  }
  return {
    loss: lossSum / plan.numExamples,
    accuracy: correct / plan.numExamples,
  };
}

/** Copies the rows at `indices` into one batch. */
function gatherBatch(
  features: Float32Array,
  labels: Int32Array,
  indices: number[],
  exampleSize: number,
): { inputs: Float32Array; labels: Int32Array } {
  const inputs = new Float32Array(indices.length * exampleSize);
  const batchLabels = new Int32Array(indices.length);
  indices.forEach((example, row) => {
    const offset = example * exampleSize;
    inputs.set(
      features.subarray(offset, offset + exampleSize),
      row * exampleSize,
    );
    batchLabels[row] = labels[example];
  });
  return { inputs, labels: batchLabels };
}

/**
 * Runs one optimizer step and returns [loss * batch size, number correct]
 * for the batch, measured before the step.
 */
function runStep(
  state: TrainingState,
  batch: { inputs: Float32Array; labels: Int32Array },
  shape: number[],
  convImpl: ConvImpl,
): tf.Tensor1D {
  return tf.tidy(() => {
    const x = tf.tensor(batch.inputs, shape, 'float32');
    const labelIds = tf.tensor1d(batch.labels, 'int32');
    const oneHot = tf.oneHot(labelIds, NUM_CLASSES);
    let kept: tf.Tensor[] = [];
    state.optimizer.minimize(
      () => {
        const rawLogits = forwardLogits(state.weights, x, {
          fromLayer: state.fromLayer,
          convImpl,
          constantInput: true,
        });
        const logits =
          state.classMask === undefined
            ? rawLogits
            : tf.add(rawLogits, state.classMask);
        const crossEntropy = tf.losses.softmaxCrossEntropy(oneHot, logits);
        const correct = tf.sum(
          tf.cast(tf.equal(tf.argMax(logits, 1), labelIds), 'float32'),
        );
        // minimize disposes the returned loss, so keep a clone of it.
        kept = [tf.keep(tf.clone(crossEntropy)), tf.keep(correct)];
        return state.proximalMu > 0
          ? tf.add(crossEntropy, proximalTerm(state))
          : (crossEntropy as tf.Scalar);
      },
      false,
      [...state.variables.values()],
    );
    const totals = tf.stack([
      tf.mul(kept[0], shape[0]),
      kept[1],
    ]) as tf.Tensor1D;
    tf.dispose(kept);
    return totals;
  });
}

/** FedProx: mu/2 * sum over trainable tensors of ||w - w_base||^2. */
function proximalTerm(state: TrainingState): tf.Scalar {
  const squares = [...state.variables].map(([name, variable]) =>
    tf.sum(tf.squaredDifference(variable, state.anchors.get(name)!)),
  );
  return tf.mul(tf.addN(squares), state.proximalMu / 2);
}

async function readDeltas(
  state: TrainingState,
  base: WeightMap,
): Promise<WeightMap> {
  const deltas: WeightMap = new Map();
  for (const [name, variable] of state.variables) {
    const trained = (await variable.data()) as Float32Array;
    const original = base.get(name)!;
    const delta = new Float32Array(trained.length);
    for (let i = 0; i < delta.length; i++) delta[i] = trained[i] - original[i];
    deltas.set(name, delta);
  }
  return deltas;
}
