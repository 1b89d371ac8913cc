/**
 * Names, versions and initializer layouts shared by the ONNX exporter,
 * importer and runtime, and the check that a weight map fits the model.
 */
import { ErrorCode, FleetError } from '../protocol/index.ts';
import {
  LAYERS,
  MODEL_NAME,
  TENSOR_SPECS,
  type WeightMap,
} from './architecture.ts';
/** IR version 8, the newest in the onnx-proto 8.0.1 schema (ONNX 1.10.2). */
export const ONNX_IR_VERSION = 8;
/** Opset 13: Softmax normalizes along `axis` only (older opsets flatten). */
export const ONNX_OPSET_VERSION = 13;
export const ONNX_PRODUCER_NAME = 'fleetlearn';
export const ONNX_INPUT_NAME = 'image';
export const ONNX_OUTPUT_NAME = 'probabilities';
export const ONNX_FEATURES_NAME = 'features';
/** Symbolic name of the batch dimension of the input and output. */
export const ONNX_BATCH_DIM = 'batch';

/**
 * Metadata entry with the initializer layouts, which the importer checks
 * before it reverses them. Conv kernels are stored as ONNX [out, in, kh, kw]
 * and dense kernels as TF.js [in, out].
 */
export const LAYOUT_METADATA_KEY = 'fleetlearn.weight_layout';
export const LAYOUT_METADATA_VALUE = 'conv_kernel=OIHW;dense_kernel=IO';
export const MODEL_NAME_METADATA_KEY = 'fleetlearn.model_name';

/** Shape of a tensor as ONNX stores its initializer. */
export function onnxInitializerShape(name: string): number[] {
  const spec = TENSOR_SPECS.find((candidate) => candidate.name === name);
  if (spec === undefined) throw new RangeError(`unknown tensor ${name}`);
  if (isConvKernel(name)) {
    const [kh, kw, inChannels, outChannels] = spec.shape;
    return [outChannels, inChannels, kh, kw];
  }
  return [...spec.shape];
}

/** True when `name` is the kernel of a conv layer. */
export function isConvKernel(name: string): boolean {
  const [layerName, part] = name.split('/');
  const layer = LAYERS.find((candidate) => candidate.name === layerName);
  return layer?.kind === 'conv' && part === 'kernel';
}

/** Permutes a conv kernel from TF.js [kh, kw, in, out] to ONNX [out, in, kh, kw]. */
export function convKernelToOnnx(
  values: Float32Array,
  shape: readonly number[],
): Float32Array {
  return permuteConvKernel(values, shape, 'toOnnx');
}

/** Permutes a conv kernel from ONNX back to TF.js; `shape` is [kh, kw, in, out]. */
export function convKernelFromOnnx(
  values: Float32Array,
  shape: readonly number[],
): Float32Array {
  return permuteConvKernel(values, shape, 'fromOnnx');
}

function permuteConvKernel(
  values: Float32Array,
  shape: readonly number[],
  direction: 'toOnnx' | 'fromOnnx',
): Float32Array {
  const [kh, kw, inChannels, outChannels] = shape;
  const out = new Float32Array(values.length);
  for (let y = 0; y < kh; y++) {
    for (let x = 0; x < kw; x++) {
      for (let i = 0; i < inChannels; i++) {
        for (let o = 0; o < outChannels; o++) {
          const tfIndex = ((y * kw + x) * inChannels + i) * outChannels + o;
          const onnxIndex = ((o * inChannels + i) * kh + y) * kw + x;
          if (direction === 'toOnnx') out[onnxIndex] = values[tfIndex];
          else out[tfIndex] = values[onnxIndex];
        }
      }
    }
  }
  return out;
}

/**
 * Checks that `weights` contains the tensors `names` (default: all of
 * TENSOR_SPECS) as Float32Arrays of the right length with finite values.
 * With `allowExtra` false, a tensor outside TENSOR_SPECS is rejected too.
 * Throws FleetError INVALID_MODEL naming the tensor.
 */
export function validateWeightMap(
  weights: WeightMap,
  names: readonly string[] = TENSOR_SPECS.map((spec) => spec.name),
  allowExtra = false,
): void {
  if (!(weights instanceof Map)) {
    throw new TypeError(
      `weights must be a Map of Float32Array, got ${typeof weights}`,
    );
  }
  for (const name of names) {
    const spec = TENSOR_SPECS.find((candidate) => candidate.name === name);
    if (spec === undefined) throw new RangeError(`unknown tensor ${name}`);
    const expected = spec.shape.reduce((product, dim) => product * dim, 1);
    const values = weights.get(name);
    if (values === undefined) {
      throw invalidModel(
        `weights are missing tensor ${name} of shape [${spec.shape.join(', ')}]`,
      );
    }
    if (!(values instanceof Float32Array)) {
      throw invalidModel(`tensor ${name} is not a Float32Array`);
    }
    if (values.length !== expected) {
      throw invalidModel(
        `tensor ${name} has ${values.length} values, expected ${expected} ` +
          `for shape [${spec.shape.join(', ')}]`,
      );
    }
    const bad = values.findIndex((value) => !Number.isFinite(value));
    if (bad >= 0) {
      throw invalidModel(
        `tensor ${name} has non-finite value ${values[bad]} at index ${bad}`,
      );
    }
  }
  if (allowExtra) return;
  for (const name of weights.keys()) {
    if (!TENSOR_SPECS.some((spec) => spec.name === name)) {
      throw invalidModel(
        `weights have unknown tensor ${name}; model ${MODEL_NAME} has none`,
      );
    }
  }
}

function invalidModel(message: string): FleetError {
  return new FleetError(ErrorCode.InvalidModel, message);
}
