/**
 * The vector a vehicle masks in a secure round, and the weighted mean the
 * aggregator gets back from the round's sum.
 *
 * A vehicle concatenates its deltas in the round's tensor order, clips
 * them to the L2 norm C, multiplies them by its weight w and appends w:
 * [w * clip(delta), w]. The sum over vehicles is then
 * [sum(w * delta), sum(w)], and their ratio is FedAvg's weighted mean.
 * With w = numExamples / exampleCap this is FedAvg weighted by examples;
 * with w = 1 it is the equal-weight sum DP-FedAvg needs.
 *
 * Every value lies in [-max(C, 1), max(C, 1)], which fixes the
 * quantization range.
 */
import { ErrorCode, FleetError } from '../protocol/index.ts';
import type { SecureAggregationConfig } from '../protocol/index.ts';
import { createQuantization, type Quantization } from './quantize.ts';

/**
 * Clipping aims this far below C, so that float32 rounding never takes a
 * value past the quantization bound.
 */
const CLIP_MARGIN = 1 - 1e-6;

/** The vector a vehicle masks, with facts about it for its own logs. */
export interface SecureVector {
  values: Float32Array;
  weight: number;
  /** L2 norm of the deltas before clipping. */
  norm: number;
  clipped: boolean;
}

/** Returns the quantization of every vector in a round with `config`. */
export function quantizationOf(config: SecureAggregationConfig): Quantization {
  return createQuantization(
    Math.max(config.clipNorm, 1),
    Math.max(config.maxVehicles, 1),
  );
}

/** Returns a vehicle's weight: min(numExamples, cap) / cap, or 1 without a cap. */
export function weightOf(
  numExamples: number,
  config: SecureAggregationConfig,
): number {
  if (config.exampleCap === 0) return 1;
  return Math.min(numExamples, config.exampleCap) / config.exampleCap;
}

/**
 * Builds [w * clip(delta), w] from `deltas` in `config.tensorNames` order.
 *
 * @throws FleetError WRONG_TENSORS when a tensor is missing or has another
 *   size than `sizes` gives, NON_FINITE_VALUE for NaN or infinity,
 *   INVALID_EXAMPLE_COUNT for numExamples not a positive safe integer.
 */
export function buildSecureVector(
  deltas: ReadonlyMap<string, Float32Array>,
  numExamples: number,
  config: SecureAggregationConfig,
): SecureVector {
  if (!Number.isSafeInteger(numExamples) || numExamples < 1) {
    throw new FleetError(
      ErrorCode.InvalidExampleCount,
      `numExamples is ${numExamples}; expected a positive integer`,
    );
  }
  let length = 0;
  let squares = 0;
  for (const name of config.tensorNames) {
    const values = deltas.get(name);
    if (values === undefined) {
      throw new FleetError(
        ErrorCode.WrongTensors,
        `update has no tensor ${name}; the secure round sums ` +
          config.tensorNames.join(', '),
      );
    }
    for (let i = 0; i < values.length; i++) {
      if (!Number.isFinite(values[i])) {
        throw new FleetError(
          ErrorCode.NonFiniteValue,
          `tensor ${name}[${i}] is ${values[i]}; expected a finite number`,
        );
      }
      squares += values[i] * values[i];
    }
    length += values.length;
  }
  const norm = Math.sqrt(squares);
  const limit = config.clipNorm * CLIP_MARGIN;
  const clipped = norm > limit;
  const weight = weightOf(numExamples, config);
  const factor = (clipped ? limit / norm : 1) * weight;

  const vector = new Float32Array(length + 1);
  let offset = 0;
  for (const name of config.tensorNames) {
    const values = deltas.get(name)!;
    for (let i = 0; i < values.length; i++) {
      vector[offset + i] = values[i] * factor;
    }
    offset += values.length;
  }
  vector[length] = weight;
  return { values: vector, weight, norm, clipped };
}

/** Words of the masked vector for tensors of `sizes` (plus the weight). */
export function vectorLengthOf(sizes: readonly number[]): number {
  return sizes.reduce((sum, size) => sum + size, 0) + 1;
}

/**
 * Splits the round's sum [sum(w * delta), sum(w)] into the weighted mean
 * per tensor, or the plain sum per tensor with `divideByWeight` false.
 *
 * @throws FleetError EMPTY_AGGREGATE when the weights sum to zero or less.
 */
export function splitSecureSum(
  sum: Float64Array,
  tensors: ReadonlyArray<{ name: string; size: number }>,
  divideByWeight: boolean,
): { deltas: Map<string, Float32Array>; weightSum: number } {
  const weightSum = sum[sum.length - 1];
  if (divideByWeight && !(weightSum > 0)) {
    throw new FleetError(
      ErrorCode.EmptyAggregate,
      `secure sum has total weight ${weightSum}; expected a positive weight`,
    );
  }
  const divisor = divideByWeight ? weightSum : 1;
  const deltas = new Map<string, Float32Array>();
  let offset = 0;
  for (const { name, size } of tensors) {
    const values = new Float32Array(size);
    for (let i = 0; i < size; i++) values[i] = sum[offset + i] / divisor;
    deltas.set(name, values);
    offset += size;
  }
  return { deltas, weightSum };
}

/**
 * Checks that the round's unmasked sum [sum(w * delta), sum(w)] could come
 * from `survivorCount` vehicles that followed the protocol. Each weight is
 * in (0, 1], exactly 1 without an example cap. Each clipped delta is at
 * most C long, so the sum is at most sum(w) * C long. A vehicle that sent
 * random words or skipped clipping breaks one of these, and the round
 * must fail rather than release its model. `step` is the quantization
 * step, whose rounding error the bounds allow for.
 *
 * @throws FleetError VALUE_OUT_OF_RANGE for a weight sum out of range,
 *   UPDATE_NORM_TOO_LARGE for a sum longer than the clip norm allows.
 */
export function checkSecureSum(
  sum: Float64Array,
  config: SecureAggregationConfig,
  survivorCount: number,
  step: number,
): void {
  const weightSum = sum[sum.length - 1];
  const slack = survivorCount * step;
  const equalWeights = config.exampleCap === 0;
  const weightValid = equalWeights
    ? Math.abs(weightSum - survivorCount) <= slack
    : weightSum > 0 && weightSum <= survivorCount + slack;
  if (!weightValid) {
    throw new FleetError(
      ErrorCode.ValueOutOfRange,
      `secure sum has total weight ${weightSum}, expected ` +
        (equalWeights
          ? `${survivorCount}, one per survivor`
          : `a value in (0, ${survivorCount}], at most 1 per survivor`) +
        '; a vehicle sent an input that does not follow the protocol',
    );
  }
  let squares = 0;
  for (let i = 0; i < sum.length - 1; i++) squares += sum[i] * sum[i];
  const norm = Math.sqrt(squares);
  const bound = weightSum * config.clipNorm + Math.sqrt(sum.length) * slack;
  if (!(norm <= bound)) {
    throw new FleetError(
      ErrorCode.UpdateNormTooLarge,
      `secure sum has L2 norm ${norm}, above ${bound}, the total weight ` +
        `${weightSum} times the clip norm ${config.clipNorm}; a vehicle ` +
        'skipped clipping or sent an input that does not follow the protocol',
    );
  }
}
