/**
 * Fixed-point quantization of clipped float updates into the integers
 * modulo 2^32, the group in which the masks are added.
 *
 * A value x in [-clipBound, clipBound] becomes the integer round(x * scale),
 * stored modulo 2^32 (two's complement for negative values). The scale is
 * chosen so that maxVehicles such integers sum to at most 2^31 - 1 in
 * magnitude, so the modular sum, read as a signed 32-bit integer, is the
 * exact integer sum and decodes without wrap-around ambiguity.
 */
import { randomFillSync } from 'node:crypto';

const MAX_INT32 = 2 ** 31 - 1;
const TWO_POW_32 = 2 ** 32;

/**
 * Rounding to the integer grid. `deterministic` rounds to the nearest
 * integer (ties toward +infinity, as Math.round does), so the error is at
 * most step / 2. `stochastic` rounds up with probability equal to the
 * fractional part (randomness from node:crypto), so the rounded value is
 * unbiased and the error is below one step.
 */
export type RoundingMode = 'deterministic' | 'stochastic';

/** Fixed-point parameters shared by every vehicle of a round. */
export interface Quantization {
  /** Largest accepted absolute value, as given by the caller. */
  readonly clipBound: number;
  /** Number of summands the modular sum decodes without ambiguity. */
  readonly maxVehicles: number;
  /** Integers per unit: a value x maps to round(x * scale). */
  readonly scale: number;
  /** Value of one integer step, 1 / scale. */
  readonly step: number;
  /** Largest absolute integer one vehicle contributes per element. */
  readonly maxMagnitude: number;
}

/**
 * Creates the quantization for values clipped to `clipBound` and summed
 * over at most `maxVehicles` vehicles. The float32 rounding of the bound is
 * accepted too, because clipping into a Float32Array can round up (0.1
 * becomes 0.100000001).
 *
 * @throws RangeError when clipBound is not a positive finite float32 value
 *   or maxVehicles is not an integer in [1, 2^31 - 1].
 */
export function createQuantization(
  clipBound: number,
  maxVehicles: number,
): Quantization {
  if (!(clipBound > 0) || !Number.isFinite(Math.fround(clipBound))) {
    throw new RangeError(
      `clipBound is ${clipBound}; expected a positive finite float32 value`,
    );
  }
  if (
    !Number.isInteger(maxVehicles) ||
    maxVehicles < 1 ||
    maxVehicles > MAX_INT32
  ) {
    throw new RangeError(
      `maxVehicles is ${maxVehicles}; expected an integer in [1, ${MAX_INT32}]`,
    );
  }

  const maxMagnitude = Math.floor(MAX_INT32 / maxVehicles);
  const acceptedBound = Math.max(clipBound, Math.fround(clipBound));
  const scale = maxMagnitude / acceptedBound;
  return Object.freeze({
    clipBound,
    maxVehicles,
    scale,
    step: 1 / scale,
    maxMagnitude,
  });
}

/**
 * Quantizes `values` to words modulo 2^32.
 *
 * @throws RangeError naming the first element that is NaN or outside
 *   [-clipBound, clipBound]; the caller clips before quantizing.
 */
export function quantize(
  values: Float32Array,
  quantization: Quantization,
  rounding: RoundingMode = 'deterministic',
): Uint32Array {
  const { scale, maxMagnitude } = quantization;
  const acceptedBound = maxMagnitude / scale;
  const fractions =
    rounding === 'stochastic'
      ? randomFillSync(new Uint32Array(values.length))
      : null;
  const words = new Uint32Array(values.length);

  for (let i = 0; i < values.length; i++) {
    const value = values[i];
    if (!(Math.abs(value) <= acceptedBound)) {
      throw new RangeError(
        `values[${i}] is ${value}; expected a number in ` +
          `[-${quantization.clipBound}, ${quantization.clipBound}] ` +
          '(clip the update before quantizing)',
      );
    }
    const scaled = value * scale;
    let integer =
      fractions === null
        ? Math.round(scaled)
        : Math.floor(scaled + fractions[i] / TWO_POW_32);
    // value * scale can exceed maxMagnitude by a rounding error at the bound.
    integer = Math.min(maxMagnitude, Math.max(-maxMagnitude, integer));
    words[i] = integer; // Uint32Array stores the integer modulo 2^32
  }
  return words;
}

/**
 * Decodes the modular sum of `count` quantized vectors into the float sum.
 * Float64 keeps the precision of the integer sum, which float32 would lose
 * for steps this fine.
 *
 * @throws RangeError when count is not an integer in [1, maxVehicles].
 */
export function dequantizeSum(
  sumWords: Uint32Array,
  quantization: Quantization,
  count: number,
): Float64Array {
  if (
    !Number.isInteger(count) ||
    count < 1 ||
    count > quantization.maxVehicles
  ) {
    throw new RangeError(
      `count is ${count}; expected an integer in ` +
        `[1, ${quantization.maxVehicles}] (maxVehicles of the quantization)`,
    );
  }

  const sum = new Float64Array(sumWords.length);
  for (let i = 0; i < sumWords.length; i++) {
    sum[i] = (sumWords[i] | 0) / quantization.scale;
  }
  return sum;
}
