/**
 * L2 norm bound on updates. A boosted or scaled update has a norm far
 * above the honest ones, so each update is compared with a multiple of the
 * round's median norm, with an absolute bound, or with both. An update
 * above the bound is clipped (scaled down to the bound) or rejected.
 * clipToNorm is the plain per-update clip to a norm C that DP-FedAvg
 * applies before adding noise.
 *
 * The median-relative bound needs every update of the round at once; see
 * vehicle-update.ts for what holding them costs.
 */
import { ErrorCode } from '../../protocol/index.ts';
import type { WeightMap } from '../../models/architecture.ts';
import {
  type VehicleUpdate,
  compareIds,
  findNonFinite,
  nonFiniteError,
  requireRule,
  sortUpdates,
} from './vehicle-update.ts';

/** Result of clipToNorm. */
export interface ClipResult {
  /** Scaled copies when clipped, otherwise the input arrays (not copied). */
  deltas: WeightMap;
  /** L2 norm of the input, over all tensors. */
  norm: number;
  /** Factor applied to every value, 1 when not clipped. */
  scale: number;
  isClipped: boolean;
}

/** Options of applyNormBound, which needs medianFactor, maxNorm or both. */
export interface NormBoundOptions {
  /** 'clip' scales an update above the bound down to it, 'reject' drops it. */
  action: 'clip' | 'reject';
  /**
   * Bound as a multiple of the median L2 norm of the round's finite
   * updates (mean of the two middle norms for an even count), > 0.
   */
  medianFactor?: number;
  /** Absolute bound on the L2 norm, >= 0. With both, the smaller applies. */
  maxNorm?: number;
}

/** Decision on one update, for the aggregator to aggregate and ack. */
export type NormDecision =
  | {
      vehicleId: string;
      outcome: 'accepted';
      norm: number;
      /** The input arrays, not copied. */
      deltas: WeightMap;
    }
  | {
      vehicleId: string;
      outcome: 'clipped';
      norm: number;
      scale: number;
      /** Scaled copies whose L2 norm is at most the bound. */
      deltas: WeightMap;
      reason: string;
    }
  | {
      vehicleId: string;
      outcome: 'rejected';
      /** Absent when the update contains NaN or infinite values. */
      norm?: number;
      /** Ack reason code: UPDATE_NORM_TOO_LARGE or NON_FINITE_VALUE. */
      reasonCode: ErrorCode;
      reason: string;
    };

/** Result of applyNormBound. */
export interface NormBoundResult {
  /** One decision per update, in vehicle id order. */
  decisions: NormDecision[];
  /** Median L2 norm of the finite updates, absent when none is finite. */
  medianNorm?: number;
  /**
   * Bound applied. It is absent only when maxNorm is unset and no update
   * is finite, and then every update is rejected.
   */
  bound?: number;
}

/**
 * Returns the L2 norm of all values of all tensors, summed in float64 in
 * sorted tensor name order.
 *
 * @throws {FleetError} NON_FINITE_VALUE when a value is NaN or infinite.
 */
export function computeUpdateNorm(
  deltas: ReadonlyMap<string, Float32Array>,
): number {
  const found = findNonFinite(deltas);
  if (found !== undefined) throw nonFiniteError(found);

  let sumOfSquares = 0;
  for (const name of [...deltas.keys()].sort(compareIds)) {
    for (const value of deltas.get(name)!) sumOfSquares += value * value;
  }
  return Math.sqrt(sumOfSquares);
}

/**
 * Scales `deltas` down so that their L2 norm is at most `maxNorm`, or
 * returns them unchanged when it already is. The float32 result is
 * checked, so its norm never exceeds maxNorm by rounding.
 *
 * @throws {FleetError} NON_FINITE_VALUE when a value is NaN or infinite.
 * @throws {RangeError} unless maxNorm is finite and >= 0.
 */
export function clipToNorm(
  deltas: ReadonlyMap<string, Float32Array>,
  maxNorm: number,
): ClipResult {
  if (!(Number.isFinite(maxNorm) && maxNorm >= 0)) {
    throw new RangeError(`maxNorm must be finite and >= 0, got ${maxNorm}`);
  }
  const norm = computeUpdateNorm(deltas);
  if (norm <= maxNorm) {
    return { deltas: new Map(deltas), norm, scale: 1, isClipped: false };
  }
  const { scaled, scale } = scaleBelowNorm(deltas, norm, maxNorm);
  return { deltas: scaled, norm, scale, isClipped: true };
}

/**
 * Decides, for each update, whether its L2 norm is within the bound:
 * within it is accepted, above it is clipped or rejected according to
 * `action`, and an update with a NaN or infinite value is rejected with
 * NON_FINITE_VALUE and left out of the median.
 *
 * @throws {FleetError} ROBUST_RULE_UNSATISFIED when medianFactor is set
 *   and there are no updates (the median needs n >= 1),
 *   DUPLICATE_UPDATE for a repeated vehicle id.
 * @throws {RangeError} for bad options or a bad numExamples.
 */
export function applyNormBound(
  updates: readonly VehicleUpdate[],
  options: NormBoundOptions,
): NormBoundResult {
  checkNormBoundOptions(options);
  const { medianFactor, maxNorm } = options;
  requireRule(
    medianFactor === undefined || updates.length >= 1,
    'norm bound relative to the median norm needs n >= 1 updates, got n = 0',
  );

  const sorted = sortUpdates(updates);
  const norms = sorted.map((update) =>
    findNonFinite(update.deltas) === undefined
      ? computeUpdateNorm(update.deltas)
      : undefined,
  );
  const medianNorm = computeMedian(norms.filter((n) => n !== undefined));
  const bounds: number[] = [];
  if (medianFactor !== undefined && medianNorm !== undefined) {
    bounds.push(medianFactor * medianNorm);
  }
  if (maxNorm !== undefined) bounds.push(maxNorm);
  const bound = bounds.length > 0 ? Math.min(...bounds) : undefined;

  const decisions = sorted.map((update, k) =>
    decideUpdate(update, norms[k], bound, options),
  );
  return { decisions, medianNorm, bound };
}

function checkNormBoundOptions(options: NormBoundOptions): void {
  const { action, medianFactor, maxNorm } = options;
  if (action !== 'clip' && action !== 'reject') {
    throw new RangeError(`action must be 'clip' or 'reject', got ${action}`);
  }
  if (medianFactor === undefined && maxNorm === undefined) {
    throw new RangeError('norm bound needs medianFactor, maxNorm or both');
  }
  if (
    medianFactor !== undefined &&
    !(Number.isFinite(medianFactor) && medianFactor > 0)
  ) {
    throw new RangeError(
      `medianFactor must be finite and > 0, got ${medianFactor}`,
    );
  }
  if (maxNorm !== undefined && !(Number.isFinite(maxNorm) && maxNorm >= 0)) {
    throw new RangeError(`maxNorm must be finite and >= 0, got ${maxNorm}`);
  }
}

function decideUpdate(
  update: VehicleUpdate,
  norm: number | undefined,
  bound: number | undefined,
  options: NormBoundOptions,
): NormDecision {
  const { vehicleId, deltas } = update;
  if (norm === undefined) {
    const error = nonFiniteError(findNonFinite(deltas)!, vehicleId);
    return {
      vehicleId,
      outcome: 'rejected',
      reasonCode: ErrorCode.NonFiniteValue,
      reason: error.message,
    };
  }
  if (bound === undefined || norm <= bound) {
    return { vehicleId, outcome: 'accepted', norm, deltas: new Map(deltas) };
  }

  const reason =
    `update from vehicle ${vehicleId} has L2 norm ${norm}, above the ` +
    `bound ${bound}${describeBound(options)}`;
  if (options.action === 'reject') {
    return {
      vehicleId,
      outcome: 'rejected',
      norm,
      reasonCode: ErrorCode.UpdateNormTooLarge,
      reason,
    };
  }
  const { scaled, scale } = scaleBelowNorm(deltas, norm, bound);
  return { vehicleId, outcome: 'clipped', norm, scale, deltas: scaled, reason };
}

function describeBound(options: NormBoundOptions): string {
  const parts: string[] = [];
  if (options.medianFactor !== undefined) {
    parts.push(`${options.medianFactor} x the median norm`);
  }
  if (options.maxNorm !== undefined) parts.push(`maxNorm ${options.maxNorm}`);
  return ` (the smaller of ${parts.join(' and ')})`;
}

/** Returns the median of `values`, or undefined when there are none. */
function computeMedian(values: number[]): number | undefined {
  if (values.length === 0) return undefined;
  const sorted = Float64Array.from(values).sort();
  const middle = sorted.length >> 1;
  return sorted.length % 2 === 1
    ? sorted[middle]
    : (sorted[middle - 1] + sorted[middle]) / 2;
}

/**
 * Shrink steps before scaleBelowNorm gives up. One step is enough: it
 * outweighs the float32 rounding, and the float64 norm's own rounding
 * error is below 2^-30 relative for updates under 2^23 values.
 */
const MAX_SHRINK_STEPS = 8;
/** Relative shrink per step, above the float32 rounding of 2^-24. */
const SHRINK_FACTOR = 1 - 2 ** -22;

/**
 * Returns float32 copies of `deltas` times maxNorm / norm. Rounding each
 * value to float32 can raise the norm by up to 2^-24 relative, so the
 * result is measured and the scale shrunk by 2^-22 until it is within.
 */
function scaleBelowNorm(
  deltas: ReadonlyMap<string, Float32Array>,
  norm: number,
  maxNorm: number,
): { scaled: WeightMap; scale: number } {
  let scale = maxNorm / norm;
  for (let step = 0; step <= MAX_SHRINK_STEPS; step++) {
    const scaled: WeightMap = new Map();
    for (const [name, values] of deltas) {
      const copy = new Float32Array(values.length);
      for (let i = 0; i < values.length; i++) copy[i] = values[i] * scale;
      scaled.set(name, copy);
    }
    if (computeUpdateNorm(scaled) <= maxNorm) return { scaled, scale };
    scale *= SHRINK_FACTOR;
  }
  throw new Error(
    `scaling an update of L2 norm ${norm} to ${maxNorm} failed after ` +
      `${MAX_SHRINK_STEPS} shrink steps`,
  );
}
