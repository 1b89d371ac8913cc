/**
 * Helpers shared by the implementations of ExactSums that keep each
 * tensor's limbs in three Float64Arrays (JavaScript and native).
 */
import type { ExactSums } from './exact-sums.ts';

/** Scale between the limbs: high counts 2^-26, low counts 2^-52. */
export const LIMB_SCALE = 2 ** 26;

/** Limbs of one tensor: whole + (high + low / 2^26) / 2^26 per element. */
export interface Limbs {
  whole: Float64Array;
  high: Float64Array;
  low: Float64Array;
}

/**
 * Creates zero limbs for `size` elements. The arrays are written once
 * here, so that the operating system maps their pages when a round opens.
 * Without that, first-touch page faults made the first sums about 3 times
 * slower (measured on a 2-core VM).
 */
export function createLimbs(size: number): Limbs {
  return {
    whole: new Float64Array(size).fill(0),
    high: new Float64Array(size).fill(0),
    low: new Float64Array(size).fill(0),
  };
}

/** Returns the limbs' sums divided by `divisor`, rounded to float32. */
export function divideLimbs(limbs: Limbs, divisor: number): Float32Array {
  const { whole, high, low } = limbs;
  const quotient = new Float32Array(whole.length);
  for (let i = 0; i < whole.length; i++) {
    quotient[i] =
      (whole[i] + (high[i] + low[i] / LIMB_SCALE) / LIMB_SCALE) / divisor;
  }
  return quotient;
}

/**
 * Adds the updates one by one, as ExactSums.addBatch for implementations
 * without a batched kernel. On an invalid value it subtracts the updates
 * already added, which is exact because the limbs are integers.
 */
export function addOneByOne(
  sums: ExactSums,
  tensor: number,
  values: readonly Float32Array[],
  numExamples: Float64Array,
  maxAbsValues: Float64Array,
): -1 | [number, number] {
  for (let k = 0; k < values.length; k++) {
    const index = sums.add(tensor, values[k], numExamples[k], maxAbsValues[k]);
    if (index < 0) continue;
    for (let added = 0; added < k; added++) {
      sums.subtract(tensor, values[added], numExamples[added]);
    }
    return [k, index];
  }
  return -1;
}
