import * as tf from '@tensorflow/tfjs';

import {
  IMAGE_CHANNELS,
  IMAGE_SIZE,
  NUM_CLASSES,
  TENSOR_SPECS,
  type WeightMap,
} from './architecture.ts';
import { currentTrainingBackend, selectTrainingBackend } from './backend.ts';
import { forwardProbabilities, type TensorMap } from './forward.ts';
import { checkWeights, describe, SHAPES } from './training-checks.ts';

const PREDICT_BATCH_SIZE = 256;

/**
 * Returns softmax probabilities [count * 43] of `weights` on images NHWC
 * [count, 32, 32, 3], computed with native convolutions in batches of 256.
 * Runs on the backend selectTrainingBackend chose, selecting one first if
 * none was.
 *
 * @throws {TypeError} when `images` is not a Float32Array.
 * @throws {RangeError} when `count` is not an integer >= 0, `images` has
 *   the wrong length, or a weight tensor is missing or of the wrong size.
 */
export async function predictTfjs(
  weights: WeightMap,
  images: Float32Array,
  count: number,
): Promise<Float32Array> {
  if (!(images instanceof Float32Array)) {
    throw new TypeError(
      `images must be a Float32Array, got ${describe(images)}`,
    );
  }
  if (!Number.isSafeInteger(count) || count < 0) {
    throw new RangeError(`count must be an integer >= 0, got ${count}`);
  }
  const imageValues = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS;
  if (images.length !== count * imageValues) {
    throw new RangeError(
      `images has ${images.length} values, but ${count} images need ` +
        `${count * imageValues}`,
    );
  }
  checkWeights(weights, 0);
  if (currentTrainingBackend() === undefined) await selectTrainingBackend();

  const tensors = toTensors(
    weights,
    TENSOR_SPECS.map((spec) => spec.name),
  );
  try {
    const probabilities = new Float32Array(count * NUM_CLASSES);
    for (let start = 0; start < count; start += PREDICT_BATCH_SIZE) {
      const size = Math.min(PREDICT_BATCH_SIZE, count - start);
      const batch = images.subarray(
        start * imageValues,
        (start + size) * imageValues,
      );
      const output = tf.tidy(() =>
        forwardProbabilities(
          tensors,
          tf.tensor4d(batch, [size, IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS]),
        ),
      );
      probabilities.set(await output.data(), start * NUM_CLASSES);
      output.dispose();
    }
    return probabilities;
  } finally {
    tf.dispose([...tensors.values()]);
  }
}

/** Uploads the named tensors of `weights`. */
export function toTensors(weights: WeightMap, names: string[]): TensorMap {
  return new Map(
    names.map((name) => [
      name,
      tf.tensor(weights.get(name)!, SHAPES.get(name)!, 'float32'),
    ]),
  );
}
