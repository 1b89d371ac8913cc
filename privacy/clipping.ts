/**
 * Per-update L2 clipping for DP-FedAvg. Clipping bounds what one vehicle
 * can add to the round's sum, which is the sensitivity the Gaussian noise
 * is calibrated to. The norm is taken over all tensors of the update
 * together, as one flat vector.
 */
import type { WeightMap } from '../models/architecture.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';

/** A clipped copy of an update and the norm it had before clipping. */
export interface ClippedUpdate {
  /** New arrays; the input update is not modified. */
  clipped: WeightMap;
  /** L2 norm of the input over all tensors, computed in float64. */
  norm: number;
  /** Factor applied to every value: min(1, clipNorm / norm) or just below. */
  scale: number;
}

/** Returns the L2 norm of all values of all tensors, summed in float64. */
export function computeUpdateNorm(
  update: ReadonlyMap<string, Float32Array>,
): number {
  let sumOfSquares = 0;
  for (const values of update.values()) {
    for (let i = 0; i < values.length; i++) {
      sumOfSquares += values[i] * values[i];
    }
  }
  return Math.sqrt(sumOfSquares);
}

function scaleUpdate(
  update: ReadonlyMap<string, Float32Array>,
  scale: number,
): WeightMap {
  const scaled: WeightMap = new Map();
  for (const [name, values] of update) {
    const copy = new Float32Array(values.length);
    for (let i = 0; i < values.length; i++) copy[i] = values[i] * scale;
    scaled.set(name, copy);
  }
  return scaled;
}

/**
 * Clips an update to L2 norm at most `clipNorm`: an update within the
 * bound is copied unchanged, a longer one is scaled by clipNorm / norm.
 * Rounding the scaled values to float32 can leave the norm a few ulps
 * above clipNorm, so the scale is then lowered by one part in 2^24 until
 * the float32 result is within the bound. The returned update always has
 * norm <= clipNorm.
 *
 * @param clipNorm C, a positive finite number.
 * @throws {RangeError} when clipNorm is not positive and finite.
 * @throws {FleetError} NON_FINITE_VALUE when the update contains NaN or
 *   Infinity, or its norm overflows, so that no scale can clip it.
 */
export function clipUpdate(
  update: ReadonlyMap<string, Float32Array>,
  clipNorm: number,
): ClippedUpdate {
  if (!(clipNorm > 0) || !Number.isFinite(clipNorm)) {
    throw new RangeError(
      `clip norm must be a positive finite number, got ${clipNorm}`,
    );
  }
  const norm = computeUpdateNorm(update);
  if (!Number.isFinite(norm)) {
    throw new FleetError(
      ErrorCode.NonFiniteValue,
      `update has L2 norm ${norm}; it contains NaN or Infinity values or ` +
        `overflows, so it cannot be clipped to ${clipNorm}`,
    );
  }

  if (norm <= clipNorm) {
    return { clipped: scaleUpdate(update, 1), norm, scale: 1 };
  }
  let scale = clipNorm / norm;
  let clipped = scaleUpdate(update, scale);
  while (computeUpdateNorm(clipped) > clipNorm) {
    scale *= 1 - 2 ** -24;
    clipped = scaleUpdate(update, scale);
  }
  return { clipped, norm, scale };
}
