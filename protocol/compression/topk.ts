/**
 * Top-k sparsification: each tensor sends only its k largest-magnitude
 * elements, as flat positions plus float32 values.
 */
import { ErrorCode, FleetError } from '../errors.ts';

/**
 * Relative slack on density x size before rounding up. The density
 * travels as float32, so 0.07 arrives as 0.0700000003 and would make
 * ceil(0.07 x 100) = 8 instead of 7.
 */
const DENSITY_SLACK = 1e-6;

/**
 * Returns k for a tensor of `count` elements: ceil(density x count), at
 * least 1 and at most `count`. The density is read as float32 first, so
 * the vehicle and the aggregator get the same k from the round task.
 */
export function topkCount(count: number, density: number): number {
  if (count === 0) return 0;
  const exact = Math.fround(density) * count;
  const k = Math.ceil(exact * (1 - DENSITY_SLACK));
  return Math.max(1, Math.min(count, k));
}

/**
 * Returns the positions of the `k` largest |values| in increasing order.
 * Among equal magnitudes the lower position wins, so the choice does not
 * depend on the sort algorithm.
 */
export function selectTopK(values: Float32Array, k: number): Uint32Array {
  if (k <= 0) return new Uint32Array(0);
  if (k >= values.length) {
    return Uint32Array.from(values.keys());
  }
  const magnitudes = Float32Array.from(values, Math.abs);
  // Sorting a typed array is numeric and fast; the k-th largest
  // magnitude is the threshold.
  const sorted = magnitudes.slice().sort();
  const threshold = sorted[values.length - k];
  let above = 0;
  for (const magnitude of magnitudes) if (magnitude > threshold) above += 1;
  let tiesLeft = k - above;

  const indices = new Uint32Array(k);
  let next = 0;
  for (let i = 0; i < magnitudes.length && next < k; i++) {
    const magnitude = magnitudes[i];
    if (magnitude > threshold) {
      indices[next++] = i;
    } else if (magnitude === threshold && tiesLeft > 0) {
      indices[next++] = i;
      tiesLeft -= 1;
    }
  }
  return indices;
}

/** A top-k sparse tensor as it goes into the Tensor message. */
export interface TopKEncoded {
  /** Flat positions, strictly increasing. */
  indices: number[];
  /** Little-endian float32 value of each index. */
  data: Uint8Array;
}

/**
 * Keeps the top `k` elements of `values`.
 *
 * @throws {FleetError} NON_FINITE_VALUE for NaN or infinity, which would
 *   otherwise win or lose the selection arbitrarily.
 */
export function encodeTopK(
  name: string,
  values: Float32Array,
  k: number,
): TopKEncoded {
  const bad = values.findIndex((value) => !Number.isFinite(value));
  if (bad >= 0) {
    throw new FleetError(
      ErrorCode.NonFiniteValue,
      `tensor ${name} has value ${values[bad]} at index ${bad}; top-k ` +
        'takes finite numbers only',
    );
  }
  const indices = selectTopK(values, k);
  const data = new Uint8Array(indices.length * 4);
  const view = new DataView(data.buffer);
  indices.forEach((index, i) => view.setFloat32(i * 4, values[index], true));
  return { indices: Array.from(indices), data };
}

/**
 * Returns the dense values of a top-k tensor of `count` elements.
 *
 * @throws {FleetError} WRONG_SHAPE when `data` does not hold 4 bytes per
 *   index, and MALFORMED_PAYLOAD for an index at or beyond `count`, or
 *   indices that are not strictly increasing (unsorted or repeated).
 */
export function decodeTopK(
  name: string,
  encoded: { indices: readonly number[]; data: Uint8Array },
  count: number,
): Float32Array {
  const { indices, data } = encoded;
  if (data.byteLength !== indices.length * 4) {
    throw new FleetError(
      ErrorCode.WrongShape,
      `top-k tensor ${name} has ${data.byteLength} value bytes for ` +
        `${indices.length} indices, expected ${indices.length * 4}`,
    );
  }
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const values = new Float32Array(count);
  let previous = -1;
  for (let i = 0; i < indices.length; i++) {
    const index = indices[i];
    if (!(index < count)) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `top-k tensor ${name} has index ${index} at position ${i}, ` +
          `expected one below its ${count} elements`,
      );
    }
    if (index <= previous) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `top-k tensor ${name} has index ${index} at position ${i} after ` +
          `${previous}; expected strictly increasing indices`,
      );
    }
    values[index] = view.getFloat32(i * 4, true);
    previous = index;
  }
  return values;
}
