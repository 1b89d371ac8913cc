import * as tf from '@tensorflow/tfjs';
import { LAYERS, type Layer } from './architecture.ts';

/** Weights as TF.js tensors (or variables), keyed by tensor name. */
export type TensorMap = Map<string, tf.Tensor>;

/**
 * Convolution implementation. "native" uses tf.conv2d. "im2col" builds the
 * patches from nine shifted slices and multiplies once; its gradient needs
 * only slice, concat and matMul. "custom-grad" runs tf.conv2d and computes
 * both gradients with forward convolutions (see conv2dCustomGrad). The last
 * two train on backends without a Conv2DBackpropFilter kernel (wasm), and
 * "custom-grad" is the faster of them.
 */
export type ConvImpl = 'native' | 'im2col' | 'custom-grad';

export interface ForwardOptions {
  convImpl?: ConvImpl;
  /** Layer to start at; the input is that layer's input activation. */
  fromLayer?: string;
  /**
   * True when nothing needs the gradient of the input (images or cached
   * features), so the first "custom-grad" convolution skips computing it.
   * Default false.
   */
  constantInput?: boolean;
}

/** Converts a WeightMap of float32 arrays into TF.js tensors. */
export function toTensorMap(
  weights: Map<string, Float32Array>,
  shapes: Map<string, number[]>,
): TensorMap {
  const map: TensorMap = new Map();
  for (const [name, values] of weights) {
    const shape = shapes.get(name);
    if (shape === undefined)
      throw new RangeError(`no shape for tensor ${name}`);
    map.set(name, tf.tensor(values, shape, 'float32'));
  }
  return map;
}

function getWeight(weights: TensorMap, name: string): tf.Tensor {
  const tensor = weights.get(name);
  if (tensor === undefined)
    throw new RangeError(`weights have no tensor ${name}`);
  return tensor;
}

/** "same" 3x3 (or kxk) convolution via im2col and one matMul, NHWC. */
export function conv2dIm2col(
  input: tf.Tensor4D,
  kernel: tf.Tensor4D,
): tf.Tensor4D {
  const [batch, height, width, channels] = input.shape;
  const [kh, kw, , outChannels] = kernel.shape;
  const padTop = Math.floor((kh - 1) / 2);
  const padLeft = Math.floor((kw - 1) / 2);
  const padded = tf.pad(input, [
    [0, 0],
    [padTop, kh - 1 - padTop],
    [padLeft, kw - 1 - padLeft],
    [0, 0],
  ]);
  const patches: tf.Tensor4D[] = [];
  for (let dy = 0; dy < kh; dy++) {
    for (let dx = 0; dx < kw; dx++) {
      patches.push(
        tf.slice(padded, [0, dy, dx, 0], [batch, height, width, channels]),
      );
    }
  }
  // Patch order (dy, dx, channel) matches the kernel's [kh, kw, in] order.
  const columns = tf
    .concat(patches, 3)
    .reshape([batch * height * width, kh * kw * channels]);
  const product = tf.matMul(
    columns,
    kernel.reshape([kh * kw * channels, outChannels]),
  );
  return product.reshape([batch, height, width, outChannels]);
}

/**
 * "same" convolution, stride 1, odd square kernel, NHWC, whose gradients
 * use only the forward Conv2D kernel, so it trains on the wasm backend,
 * which lacks Conv2DBackpropFilter (tfjs 4.22).
 * - Input gradient: the output gradient convolved with the kernel rotated
 *   by 180 degrees and its in and out channels swapped.
 * - Kernel gradient: the correlation of the padded input with the output
 *   gradient, computed as one "valid" convolution in which the channels
 *   play the batch and the batch plays the channels.
 * On 2 cores with wasm this trained the full model at about 490 images/s
 * (batch 64), against about 95 for im2col. Set `inputGradient` to false
 * when the input is constant, to skip computing its gradient.
 */
export function conv2dCustomGrad(
  input: tf.Tensor4D,
  kernel: tf.Tensor4D,
  inputGradient = true,
): tf.Tensor4D {
  if (!inputGradient) {
    // Only the kernel is an input of the op, so no input gradient exists.
    const convolveKernel = tf.customGrad((...args: CustomGradArgs) => {
      const k = args[0] as tf.Tensor4D;
      return {
        value: tf.conv2d(input, k, 1, 'same'),
        gradFunc: (dy: tf.Tensor) => [
          kernelGradient(input, dy as tf.Tensor4D, k.shape),
        ],
      };
    });
    return convolveKernel(kernel) as tf.Tensor4D;
  }

  const convolveBoth = tf.customGrad((...args: CustomGradArgs) => {
    const x = args[0] as tf.Tensor4D;
    const k = args[1] as tf.Tensor4D;
    const save = args[2] as tf.GradSaveFunc;
    save([x, k]);
    return {
      value: tf.conv2d(x, k, 1, 'same'),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [savedInput, savedKernel] = saved as tf.Tensor4D[];
        return [
          inputGradientOf(dy as tf.Tensor4D, savedKernel),
          kernelGradient(savedInput, dy as tf.Tensor4D, savedKernel.shape),
        ];
      },
    };
  });
  return convolveBoth(input, kernel) as tf.Tensor4D;
}

/** Arguments tf.customGrad passes: the op's inputs, then a save function. */
type CustomGradArgs = Array<tf.Tensor | tf.GradSaveFunc>;

function inputGradientOf(dy: tf.Tensor4D, kernel: tf.Tensor4D): tf.Tensor4D {
  const flipped = tf
    .reverse(kernel, [0, 1])
    .transpose([0, 1, 3, 2]) as tf.Tensor4D;
  return tf.conv2d(dy, flipped, 1, 'same');
}

function kernelGradient(
  input: tf.Tensor4D,
  dy: tf.Tensor4D,
  kernelShape: [number, number, number, number],
): tf.Tensor4D {
  const [kh, kw] = kernelShape;
  const padTop = Math.floor((kh - 1) / 2);
  const padLeft = Math.floor((kw - 1) / 2);
  // [C, H + kh - 1, W + kw - 1, N]: channels as batch, batch as channels.
  const padded = tf
    .pad(input, [
      [0, 0],
      [padTop, kh - 1 - padTop],
      [padLeft, kw - 1 - padLeft],
      [0, 0],
    ])
    .transpose([3, 1, 2, 0]) as tf.Tensor4D;
  // [H, W, N, O]: the output gradient as an H x W kernel.
  const filter = dy.transpose([1, 2, 0, 3]) as tf.Tensor4D;
  // [C, kh, kw, O] back to the kernel layout [kh, kw, C, O].
  return tf.conv2d(padded, filter, 1, 'valid').transpose([1, 2, 0, 3]);
}

/** 2x2 max pool, stride 2, via reshape and max so its gradient runs on wasm. */
export function maxPool2x2(input: tf.Tensor4D): tf.Tensor4D {
  const [batch, height, width, channels] = input.shape;
  return input
    .reshape([batch, height / 2, 2, width / 2, 2, channels])
    .max([2, 4]) as tf.Tensor4D;
}

function convolve(
  input: tf.Tensor4D,
  kernel: tf.Tensor4D,
  convImpl: ConvImpl,
  inputGradient: boolean,
): tf.Tensor4D {
  if (convImpl === 'native') return tf.conv2d(input, kernel, 1, 'same');
  if (convImpl === 'im2col') return conv2dIm2col(input, kernel);
  return conv2dCustomGrad(input, kernel, inputGradient);
}

function applyLayer(
  layer: Layer,
  x: tf.Tensor,
  weights: TensorMap,
  convImpl: ConvImpl,
  inputGradient = true,
): tf.Tensor {
  const kernel = getWeight(weights, `${layer.name}/kernel`);
  const bias = getWeight(weights, `${layer.name}/bias`);
  if (layer.kind === 'conv') {
    const conv = convolve(
      x as tf.Tensor4D,
      kernel as tf.Tensor4D,
      convImpl,
      inputGradient,
    );
    const activated = tf.relu(tf.add(conv, bias)) as tf.Tensor4D;
    // wasm has MaxPoolGrad, so only im2col keeps the reshape-and-max pool.
    return convImpl === 'im2col'
      ? maxPool2x2(activated)
      : tf.maxPool(activated, 2, 2, 'valid');
  }
  const flat =
    x.rank === 2
      ? (x as tf.Tensor2D)
      : (x.reshape([x.shape[0], -1]) as tf.Tensor2D);
  const dense = tf.add(tf.matMul(flat, kernel as tf.Tensor2D), bias);
  return layer.relu ? tf.relu(dense) : dense;
}

/**
 * Runs the model and returns logits [N, 43]. With `fromLayer`, the input
 * is the activation that layer receives (for example the 1,024 flattened
 * features for dense1), so a frozen prefix can run elsewhere.
 */
export function forwardLogits(
  weights: TensorMap,
  input: tf.Tensor,
  options: ForwardOptions = {},
): tf.Tensor2D {
  const convImpl = options.convImpl ?? 'native';
  const start =
    options.fromLayer === undefined
      ? 0
      : LAYERS.findIndex((l) => l.name === options.fromLayer);
  if (start < 0)
    throw new RangeError(`unknown layer ${JSON.stringify(options.fromLayer)}`);
  let x = input;
  for (const [offset, layer] of LAYERS.slice(start).entries()) {
    const inputGradient = offset > 0 || options.constantInput !== true;
    x = applyLayer(layer, x, weights, convImpl, inputGradient);
  }
  return x as tf.Tensor2D;
}

/**
 * Runs the layers before `beforeLayer` and returns the activation that
 * layer receives, flattened to [N, features] when it is a dense layer.
 */
export function forwardFeatures(
  weights: TensorMap,
  input: tf.Tensor4D,
  beforeLayer: string,
  convImpl: ConvImpl = 'native',
): tf.Tensor {
  return forwardBetween(weights, input, undefined, beforeLayer, convImpl);
}

/**
 * Runs the layers from `fromLayer` (default: the first) up to, but not
 * including, `beforeLayer`, and returns the activation that layer
 * receives, flattened to [N, features] when it is a dense layer. The input
 * is the activation `fromLayer` receives.
 */
export function forwardBetween(
  weights: TensorMap,
  input: tf.Tensor,
  fromLayer: string | undefined,
  beforeLayer: string,
  convImpl: ConvImpl = 'native',
): tf.Tensor {
  const start =
    fromLayer === undefined ? 0 : LAYERS.findIndex((l) => l.name === fromLayer);
  if (start < 0)
    throw new RangeError(`unknown layer ${JSON.stringify(fromLayer)}`);
  const stop = LAYERS.findIndex((l) => l.name === beforeLayer);
  if (stop < 0)
    throw new RangeError(`unknown layer ${JSON.stringify(beforeLayer)}`);
  if (stop < start) {
    throw new RangeError(
      `layer ${beforeLayer} comes before ${fromLayer}; expected a later layer`,
    );
  }
  let x: tf.Tensor = input;
  for (const layer of LAYERS.slice(start, stop)) {
    x = applyLayer(layer, x, weights, convImpl);
  }
  return LAYERS[stop].kind === 'dense' && x.rank > 2
    ? x.reshape([x.shape[0], -1])
    : x;
}

/** Softmax probabilities [N, 43] from forwardLogits. */
export function forwardProbabilities(
  weights: TensorMap,
  input: tf.Tensor4D,
  options: ForwardOptions = {},
): tf.Tensor2D {
  return tf.tidy(() => tf.softmax(forwardLogits(weights, input, options)));
}
