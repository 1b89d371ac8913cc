/**
 * Argument checks and shape helpers of trainLocal and predictTfjs. The
 * checks throw TypeError for a wrong type and RangeError for a bad value,
 * naming the value and what was expected.
 */
import {
  IMAGE_CHANNELS,
  IMAGE_SIZE,
  LAYERS,
  NUM_CLASSES,
  TENSOR_SPECS,
  type WeightMap,
} from './architecture.ts';
import type { TrainLocalOptions } from './training.ts';

/** Shape of each tensor, by name. */
export const SHAPES: ReadonlyMap<string, number[]> = new Map(
  TENSOR_SPECS.map((spec) => [spec.name, spec.shape]),
);

/** Position of each layer in LAYERS, by name. */
export const LAYER_INDEX: ReadonlyMap<string, number> = new Map(
  LAYERS.map((layer, index) => [layer.name, index]),
);

/** Shape of one example of the activation layer `index` receives. */
export function layerInputShape(index: number): number[] {
  let shape = [IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS];
  for (const layer of LAYERS.slice(0, index)) {
    shape =
      layer.kind === 'conv'
        ? [shape[0] / 2, shape[1] / 2, layer.outChannels]
        : [layer.outUnits];
  }
  return LAYERS[index].kind === 'dense' ? [countValues(shape)] : shape;
}

export function countValues(shape: number[]): number {
  return shape.reduce((product, dim) => product * dim, 1);
}

/** Index of the layer a tensor name ("dense1/kernel") belongs to. */
export function layerIndexOf(tensorName: string): number {
  return LAYER_INDEX.get(tensorName.split('/')[0])!;
}

export function describe(value: unknown): string {
  if (value === null) return 'null';
  if (typeof value === 'object') return value.constructor?.name ?? 'object';
  return typeof value;
}

export function checkTensorNames(names: unknown): asserts names is string[] {
  if (!Array.isArray(names) || names.some((name) => typeof name !== 'string')) {
    throw new TypeError(
      `trainableTensors must be an array of tensor names, got ${describe(names)}`,
    );
  }
  if (names.length === 0) {
    throw new RangeError(
      'trainableTensors is empty; expected at least one tensor name',
    );
  }
  const seen = new Set<string>();
  for (const name of names) {
    if (!SHAPES.has(name)) {
      throw new RangeError(
        `unknown trainable tensor ${JSON.stringify(name)}; expected names ` +
          `from ${[...SHAPES.keys()].join(', ')}`,
      );
    }
    if (seen.has(name)) {
      throw new RangeError(
        `trainable tensor ${JSON.stringify(name)} is listed twice`,
      );
    }
    seen.add(name);
  }
}

export function checkOptions(options: TrainLocalOptions): void {
  if (typeof options !== 'object' || options === null) {
    throw new TypeError(`options must be an object, got ${describe(options)}`);
  }
  checkTensorNames(options.trainableTensors);
  checkInteger('epochs', options.epochs, 1);
  checkInteger('batchSize', options.batchSize, 1);
  const { learningRate, proximalMu, seed, optimizer } = options;
  if (
    typeof learningRate !== 'number' ||
    !Number.isFinite(learningRate) ||
    learningRate <= 0
  ) {
    throw new RangeError(
      `learningRate must be a finite number > 0, got ${learningRate}`,
    );
  }
  if (
    typeof proximalMu !== 'number' ||
    !Number.isFinite(proximalMu) ||
    proximalMu < 0
  ) {
    throw new RangeError(
      `proximalMu must be a finite number >= 0, got ${proximalMu}`,
    );
  }
  if (!Number.isSafeInteger(seed)) {
    throw new RangeError(`seed must be a safe integer, got ${seed}`);
  }
  if (
    optimizer !== undefined &&
    optimizer !== 'adam' &&
    optimizer !== 'sgd-momentum'
  ) {
    throw new RangeError(
      `unknown optimizer ${JSON.stringify(optimizer)}; expected adam or sgd-momentum`,
    );
  }
  const { restrictToLocalClasses } = options;
  if (
    restrictToLocalClasses !== undefined &&
    typeof restrictToLocalClasses !== 'boolean'
  ) {
    throw new TypeError(
      `restrictToLocalClasses must be a boolean, got ${describe(restrictToLocalClasses)}`,
    );
  }
}

function checkInteger(field: string, value: unknown, min: number): void {
  if (typeof value !== 'number') {
    throw new TypeError(`${field} must be a number, got ${describe(value)}`);
  }
  if (!Number.isSafeInteger(value) || value < min) {
    throw new RangeError(`${field} must be an integer >= ${min}, got ${value}`);
  }
}

export function checkFromLayer(fromLayer: unknown): number {
  const index =
    typeof fromLayer === 'string' ? LAYER_INDEX.get(fromLayer) : undefined;
  if (index === undefined) {
    throw new RangeError(
      `unknown fromLayer ${JSON.stringify(fromLayer)}; expected one of ` +
        `${LAYERS.map((layer) => layer.name).join(', ')}`,
    );
  }
  return index;
}

/** Checks the tensors of the layers from `fromIndex` on. */
export function checkWeights(weights: WeightMap, fromIndex: number): void {
  if (!(weights instanceof Map)) {
    throw new TypeError(
      `weights must be a Map of Float32Arrays, got ${describe(weights)}`,
    );
  }
  for (const spec of TENSOR_SPECS) {
    if (layerIndexOf(spec.name) < fromIndex) continue;
    const values = weights.get(spec.name);
    const expected = countValues(spec.shape);
    if (!(values instanceof Float32Array) || values.length !== expected) {
      throw new RangeError(
        `weights tensor ${spec.name} is ${values === undefined ? 'missing' : `${describe(values)} of length ${values.length}`}; ` +
          `expected a Float32Array of ${expected} values`,
      );
    }
  }
}

export function checkExamples(
  inputs: Float32Array,
  labels: Int32Array,
  inputLayer: number,
): void {
  if (!(inputs instanceof Float32Array)) {
    throw new TypeError(
      `inputs must be a Float32Array, got ${describe(inputs)}`,
    );
  }
  if (!(labels instanceof Int32Array)) {
    throw new TypeError(
      `labels must be an Int32Array, got ${describe(labels)}`,
    );
  }
  if (labels.length === 0) {
    throw new RangeError('labels is empty; expected at least one example');
  }
  const exampleSize = countValues(layerInputShape(inputLayer));
  if (inputs.length !== labels.length * exampleSize) {
    throw new RangeError(
      `inputs has ${inputs.length} values, but ${labels.length} labels of ` +
        `${exampleSize} values each (input of ${LAYERS[inputLayer].name}) ` +
        `need ${labels.length * exampleSize}`,
    );
  }
  const bad = labels.findIndex((label) => label < 0 || label >= NUM_CLASSES);
  if (bad >= 0) {
    throw new RangeError(
      `labels[${bad}] is ${labels[bad]}; expected a class id in 0..${NUM_CLASSES - 1}`,
    );
  }
}
