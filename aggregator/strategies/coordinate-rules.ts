/**
 * Coordinate-wise robust rules (Yin et al., "Byzantine-Robust Distributed
 * Learning: Towards Optimal Statistical Rates", 2018): each coordinate of
 * the result is the median, or the trimmed mean, of that coordinate across
 * the round's updates. Both are unweighted, see VehicleUpdate.numExamples.
 *
 * Memory is O(n x model size) for the inputs, which the caller already
 * holds, plus one float32 output and one scratch array of n values that
 * is reused for every coordinate (see vehicle-update.ts for the sizes).
 * Sums run in float64 in sorted value order, and the updates are sorted by
 * vehicle id first, so the same updates in any order give the same bytes.
 */
import type { WeightMap } from '../../models/architecture.ts';
import {
  type CheckedUpdates,
  type VehicleUpdate,
  checkCount,
  checkUpdates,
  requireRule,
} from './vehicle-update.ts';

/** Options of aggregateMedian. */
export interface MedianOptions {
  /**
   * Number of Byzantine updates to tolerate, f, by default 0. The median
   * stays within the honest values' range while f < n / 2.
   */
  byzantineCount?: number;
}

/** How many updates aggregateTrimmedMean drops at each end. */
export type TrimOptions =
  /** Drop exactly this many values from each end. */
  | { trimCount: number }
  /**
   * Drop floor(trimFraction x n) values from each end, as
   * scipy.stats.trim_mean does. With few updates that can be 0.
   */
  | { trimFraction: number };

/** Result of aggregateTrimmedMean. */
export interface TrimmedMeanResult {
  deltas: WeightMap;
  /** Values dropped from each end of every coordinate. */
  trimCount: number;
}

/**
 * Returns the coordinate-wise median of the updates' deltas. For an even
 * number of updates a coordinate's median is the mean of its two middle
 * values, rounded once to float32.
 *
 * Requirement: n >= 2f + 1 updates, which is n >= 1 for the default f = 0.
 *
 * @throws {FleetError} ROBUST_RULE_UNSATISFIED when the requirement fails,
 *   NON_FINITE_VALUE or DUPLICATE_UPDATE from checkUpdates.
 * @throws {RangeError} for a bad f or mismatched tensors.
 */
export function aggregateMedian(
  updates: readonly VehicleUpdate[],
  options: MedianOptions = {},
): WeightMap {
  const f = options.byzantineCount ?? 0;
  checkCount('byzantineCount', f);
  const n = updates.length;
  requireRule(
    n >= 2 * f + 1,
    `coordinate-wise median with f = ${f} needs n >= 2f + 1 = ` +
      `${2 * f + 1} updates, got n = ${n}`,
  );

  const checked = checkUpdates(updates);
  const middle = n >> 1;
  return reduceCoordinates(checked, (sorted) =>
    n % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2,
  );
}

/**
 * Returns the coordinate-wise trimmed mean: for each coordinate, sorts the
 * n values, drops `trimCount` from each end and averages the rest in
 * float64. A trim of 0 gives the unweighted mean.
 *
 * Requirement: n > 2 x trimCount updates, so that a value remains.
 *
 * @throws {FleetError} ROBUST_RULE_UNSATISFIED when the requirement fails,
 *   NON_FINITE_VALUE or DUPLICATE_UPDATE from checkUpdates.
 * @throws {RangeError} for a trimCount that is not an integer >= 0, a
 *   trimFraction outside [0, 0.5), or mismatched tensors.
 */
export function aggregateTrimmedMean(
  updates: readonly VehicleUpdate[],
  options: TrimOptions,
): TrimmedMeanResult {
  const n = updates.length;
  const trimCount = resolveTrimCount(options, n);
  requireRule(
    n > 2 * trimCount,
    `trimmed mean dropping ${trimCount} values from each end needs ` +
      `n > 2 x trim = ${2 * trimCount} updates, got n = ${n}`,
  );

  const checked = checkUpdates(updates);
  const kept = n - 2 * trimCount;
  const deltas = reduceCoordinates(checked, (sorted) => {
    let sum = 0;
    for (let k = trimCount; k < n - trimCount; k++) sum += sorted[k];
    return sum / kept;
  });
  return { deltas, trimCount };
}

function resolveTrimCount(options: TrimOptions, n: number): number {
  if ('trimCount' in options) {
    checkCount('trimCount', options.trimCount);
    return options.trimCount;
  }
  const { trimFraction } = options;
  if (!(trimFraction >= 0 && trimFraction < 0.5)) {
    throw new RangeError(
      `trimFraction must be in [0, 0.5), got ${trimFraction}`,
    );
  }
  return Math.floor(trimFraction * n);
}

/**
 * Builds one float32 tensor per tensor name whose coordinate i is
 * `reduce` of the n values at i, passed sorted ascending in one reused
 * scratch array. The values are finite (checkUpdates ran), so the
 * numeric sort of Float32Array has no NaN to place.
 */
function reduceCoordinates(
  checked: CheckedUpdates,
  reduce: (sorted: Float32Array) => number,
): WeightMap {
  const { updates, tensorSizes } = checked;
  const n = updates.length;
  const scratch = new Float32Array(n);
  const result: WeightMap = new Map();

  for (const [name, size] of tensorSizes) {
    const columns = updates.map((update) => update.deltas.get(name)!);
    const values = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      for (let k = 0; k < n; k++) scratch[k] = columns[k][i];
      scratch.sort();
      values[i] = reduce(scratch);
    }
    result.set(name, values);
  }
  return result;
}
