/**
 * Values, updates and the reference arithmetic shared by the tests of the
 * exact FedAvg sums.
 */
import {
  MAX_ABS_WEIGHTED_DELTA,
  MAX_EXAMPLES_PER_ADD,
} from '../aggregator/fedavg.ts';
import { createRandom } from '../models/index.ts';

const SCALE = 2 ** 26;

/**
 * Computes the mean with the accumulator's arithmetic from before the
 * kernel: three Float64Array limbs per tensor and a scalar loop.
 */
export function referenceMean(
  updates: { values: Float32Array; numExamples: number }[],
): Float32Array {
  const size = updates[0].values.length;
  const whole = new Float64Array(size);
  const high = new Float64Array(size);
  const low = new Float64Array(size);
  let total = 0;
  for (const { values, numExamples } of updates) {
    for (let i = 0; i < size; i++) {
      const product = values[i] * numExamples;
      const wholePart = Math.trunc(product);
      const fraction = (product - wholePart) * SCALE;
      const highPart = Math.trunc(fraction);
      whole[i] += wholePart;
      high[i] += highPart;
      low[i] += Math.round((fraction - highPart) * SCALE);
    }
    total += numExamples;
  }
  const mean = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    mean[i] = (whole[i] + (high[i] + low[i] / SCALE) / SCALE) / total;
  }
  return mean;
}

/** Values that stress the limb split: subnormals, halves, limits, zeros. */
export function extremeValues(numExamples: number): number[] {
  const limit = MAX_ABS_WEIGHTED_DELTA / numExamples;
  const atLimit = Math.fround(limit) <= limit ? Math.fround(limit) : 0;
  return [
    0,
    -0,
    2 ** -149,
    -(2 ** -149),
    2 ** -126 - 2 ** -149,
    2 ** -126,
    2 ** -53,
    -(2 ** -53),
    3 * 2 ** -54,
    -3 * 2 ** -54,
    2 ** -52 * (1 + 2 ** -23),
    2 ** -27 + 2 ** -50,
    1 - 2 ** -24,
    -(1 - 2 ** -24),
    0.5,
    -0.5,
    atLimit,
    -atLimit,
    Math.fround(limit / 3),
  ];
}

/** Random float32 values over many magnitudes, with the extremes mixed in. */
export function randomUpdate(
  size: number,
  numExamples: number,
  random: () => number,
  exponents: [number, number] = [-60, 20],
): Float32Array {
  const limit = MAX_ABS_WEIGHTED_DELTA / numExamples;
  const [lowest, highest] = exponents;
  const values = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    const exponent = lowest + Math.floor(random() * (highest - lowest));
    const magnitude = 2 ** exponent;
    const value = (random() - 0.5) * magnitude;
    values[i] = Math.sign(value) * Math.min(limit / 2, Math.abs(value));
  }
  const extremes = extremeValues(numExamples);
  for (let i = 0; i < extremes.length && i < size; i++) {
    values[Math.floor(random() * size)] = extremes[i];
  }
  return values;
}

export function bytesOf(values: Float32Array): Buffer {
  return Buffer.from(values.buffer, values.byteOffset, values.byteLength);
}

export function plan(
  seed: number,
  size: number,
  count: number,
  exponents?: [number, number],
) {
  const random = createRandom(seed);
  const weights = [1, 2, 3, 1000, 65_537, MAX_EXAMPLES_PER_ADD];
  return Array.from({ length: count }, (_, index) => {
    const numExamples =
      index < weights.length ? weights[index] : 1 + Math.floor(random() * 5000);
    const values = randomUpdate(size, numExamples, random, exponents);
    return { values, numExamples };
  });
}
