import * as tf from '@tensorflow/tfjs';
import { LAYERS, type Layer } from './architecture.ts';

/** Weights as TF.js tensors (or variables), keyed by tensor name. */
export type TensorMap = Map<string, tf.Tensor>;

/**
 * How convolutions run. "native" uses tf.conv2d. "im2col" builds the
 * patches from nine shifted slices and multiplies once; it is for training
 * on backends without a Conv2DBackpropFilter kernel (wasm), because its
 * gradient needs only slice, concat and matMul.
 */
export type ConvImpl = 'native' | 'im2col';

export interface ForwardOptions {
  convImpl?: ConvImpl;
  /** Layer to start at; the input is that layer's input activation. */
  fromLayer?: string;
}

/** Converts a WeightMap of float32 arrays into TF.js tensors. */
export function toTensorMap(weights: Map<string, Float32Array>, shapes: Map<string, number[]>): TensorMap {
  const map: TensorMap = new Map();
  for (const [name, values] of weights) {
    const shape = shapes.get(name);
    if (shape === undefined) throw new RangeError(`no shape for tensor ${name}`);
    map.set(name, tf.tensor(values, shape, 'float32'));
  }
  return map;
}

function getWeight(weights: TensorMap, name: string): tf.Tensor {
  const tensor = weights.get(name);
  if (tensor === undefined) throw new RangeError(`weights have no tensor ${name}`);
  return tensor;
}

/** "same" 3x3 (or kxk) convolution via im2col and one matMul, NHWC. */
export function conv2dIm2col(input: tf.Tensor4D, kernel: tf.Tensor4D): tf.Tensor4D {
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
      patches.push(tf.slice(padded, [0, dy, dx, 0], [batch, height, width, channels]));
    }
  }
  // Patch order (dy, dx, channel) matches the kernel's [kh, kw, in] order.
  const columns = tf.concat(patches, 3).reshape([batch * height * width, kh * kw * channels]);
  const product = tf.matMul(columns, kernel.reshape([kh * kw * channels, outChannels]));
  return product.reshape([batch, height, width, outChannels]);
}

/** 2x2 max pool, stride 2, via reshape and max so its gradient runs on wasm. */
export function maxPool2x2(input: tf.Tensor4D): tf.Tensor4D {
  const [batch, height, width, channels] = input.shape;
  return input
    .reshape([batch, height / 2, 2, width / 2, 2, channels])
    .max([2, 4]) as tf.Tensor4D;
}

function applyLayer(layer: Layer, x: tf.Tensor, weights: TensorMap, convImpl: ConvImpl): tf.Tensor {
  const kernel = getWeight(weights, `${layer.name}/kernel`);
  const bias = getWeight(weights, `${layer.name}/bias`);
  if (layer.kind === 'conv') {
    const input = x as tf.Tensor4D;
    const conv =
      convImpl === 'native'
        ? tf.conv2d(input, kernel as tf.Tensor4D, 1, 'same')
        : conv2dIm2col(input, kernel as tf.Tensor4D);
    const activated = tf.relu(tf.add(conv, bias)) as tf.Tensor4D;
    return convImpl === 'native'
      ? tf.maxPool(activated, 2, 2, 'valid')
      : maxPool2x2(activated);
  }
  const flat = x.rank === 2 ? (x as tf.Tensor2D) : x.reshape([x.shape[0], -1]) as tf.Tensor2D;
  const dense = tf.add(tf.matMul(flat, kernel as tf.Tensor2D), bias);
  return layer.relu ? tf.relu(dense) : dense;
}

/**
 * Runs the model and returns logits [N, 43]. With `fromLayer`, the input
 * is the activation that layer receives (for example the 1,024 flattened
 * features for dense1), so a frozen prefix can run elsewhere.
 */
export function forwardLogits(weights: TensorMap, input: tf.Tensor, options: ForwardOptions = {}): tf.Tensor2D {
  const convImpl = options.convImpl ?? 'native';
  const start = options.fromLayer === undefined ? 0 : LAYERS.findIndex((l) => l.name === options.fromLayer);
  if (start < 0) throw new RangeError(`unknown layer ${JSON.stringify(options.fromLayer)}`);
  let x = input;
  for (const layer of LAYERS.slice(start)) {
    x = applyLayer(layer, x, weights, convImpl);
  }
  return x as tf.Tensor2D;
}

/**
 * Runs the layers before `beforeLayer` and returns the activation that
 * layer receives, flattened to [N, features] when it is a dense layer.
 */
export function forwardFeatures(weights: TensorMap, input: tf.Tensor4D, beforeLayer: string, convImpl: ConvImpl = 'native'): tf.Tensor {
  const stop = LAYERS.findIndex((l) => l.name === beforeLayer);
  if (stop < 0) throw new RangeError(`unknown layer ${JSON.stringify(beforeLayer)}`);
  let x: tf.Tensor = input;
  for (const layer of LAYERS.slice(0, stop)) {
    x = applyLayer(layer, x, weights, convImpl);
  }
  return LAYERS[stop].kind === 'dense' && x.rank > 2 ? x.reshape([x.shape[0], -1]) : x;
}

/** Softmax probabilities [N, 43] from forwardLogits. */
export function forwardProbabilities(weights: TensorMap, input: tf.Tensor4D, options: ForwardOptions = {}): tf.Tensor2D {
  return tf.tidy(() => tf.softmax(forwardLogits(weights, input, options)));
}
