/**
 * Krum and Multi-Krum (Blanchard et al., "Machine Learning with
 * Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017).
 *
 * With n updates of which at most f are Byzantine, the score of update i
 * is the sum of its squared L2 distances, over all tensors, to its
 * n - f - 2 nearest other updates. Krum returns the update with the lowest
 * score. Multi-Krum ranks the updates by score and returns the unweighted
 * mean of the m best, so m = 1 is Krum. Both need n > 2f + 2.
 *
 * Cost: the inputs (n x model size x 4 bytes, see vehicle-update.ts), an
 * n x n float64 distance matrix, and n(n - 1) / 2 distance computations of
 * model size each. Distances and sums run in float64 in a fixed order
 * (updates sorted by vehicle id, tensors by name), so the same updates in
 * any order give the same bytes.
 */
import type { WeightMap } from '../../models/architecture.ts';
import {
  type CheckedUpdates,
  type VehicleUpdate,
  checkCount,
  checkUpdates,
  compareIds,
  requireRule,
} from './vehicle-update.ts';

/** Options of aggregateKrum. */
export interface KrumOptions {
  /** Number of Byzantine updates to tolerate, f. */
  byzantineCount: number;
}

/** Options of aggregateMultiKrum. */
export interface MultiKrumOptions extends KrumOptions {
  /**
   * Number of best-scored updates to average, m, in 1..n. If f updates
   * are Byzantine, an m above n - f includes at least m - (n - f) of them.
   */
  selectCount: number;
}

/** Krum score of one update: lower is more central. */
export interface KrumScore {
  vehicleId: string;
  score: number;
}

/** Result of aggregateKrum and aggregateMultiKrum. */
export interface KrumResult {
  /** The selected update (Krum) or the mean of the selected updates. */
  deltas: WeightMap;
  /** Selected vehicles, best score first. */
  selectedVehicleIds: string[];
  /** Every update's score, ascending, with ties in vehicle id order. */
  scores: KrumScore[];
}

/**
 * Returns the update with the lowest Krum score, as new arrays. Equal
 * scores are ranked by vehicle id, so the smallest id wins a tie.
 *
 * @throws {FleetError} ROBUST_RULE_UNSATISFIED unless n > 2f + 2,
 *   NON_FINITE_VALUE or DUPLICATE_UPDATE from checkUpdates.
 * @throws {RangeError} for a bad f or mismatched tensors.
 */
export function aggregateKrum(
  updates: readonly VehicleUpdate[],
  options: KrumOptions,
): KrumResult {
  return aggregateMultiKrum(updates, { ...options, selectCount: 1 });
}

/**
 * Returns the unweighted mean of the m updates with the lowest Krum
 * scores, summed in float64 and rounded once to float32.
 *
 * @throws {FleetError} ROBUST_RULE_UNSATISFIED unless n > 2f + 2 and
 *   n >= m, NON_FINITE_VALUE or DUPLICATE_UPDATE from checkUpdates.
 * @throws {RangeError} for a bad f, an m below 1, or mismatched tensors.
 */
export function aggregateMultiKrum(
  updates: readonly VehicleUpdate[],
  options: MultiKrumOptions,
): KrumResult {
  const { byzantineCount: f, selectCount: m } = options;
  checkCount('byzantineCount', f);
  if (!Number.isSafeInteger(m) || m < 1) {
    throw new RangeError(`selectCount must be an integer >= 1, got ${m}`);
  }
  const n = updates.length;
  requireRule(
    n > 2 * f + 2,
    `Krum with f = ${f} needs n > 2f + 2 = ${2 * f + 2} updates, got n = ${n}`,
  );
  requireRule(
    n >= m,
    `Multi-Krum selecting m = ${m} updates needs n >= m, got n = ${n}`,
  );

  const checked = checkUpdates(updates);
  const scores = scoreUpdates(checked, n - f - 2);
  const selectedVehicleIds = scores.slice(0, m).map((s) => s.vehicleId);
  const selected = new Set(selectedVehicleIds);
  const chosen = checked.updates.filter((u) => selected.has(u.vehicleId));
  return {
    deltas: averageDeltas(chosen, checked.tensorSizes),
    selectedVehicleIds,
    scores,
  };
}

/** Returns the Krum scores, ascending, ties in vehicle id order. */
function scoreUpdates(
  checked: CheckedUpdates,
  neighbourCount: number,
): KrumScore[] {
  const { updates } = checked;
  const n = updates.length;
  const distances = computeSquaredDistances(checked);
  const row = new Float64Array(n - 1);

  const scores = updates.map(({ vehicleId }, i) => {
    let column = 0;
    for (let j = 0; j < n; j++) {
      if (j !== i) row[column++] = distances[i * n + j];
    }
    row.sort();
    let score = 0;
    for (let k = 0; k < neighbourCount; k++) score += row[k];
    return { vehicleId, score };
  });
  return scores.sort(
    (a, b) => a.score - b.score || compareIds(a.vehicleId, b.vehicleId),
  );
}

/** Returns the symmetric n x n matrix of squared L2 distances, row-major. */
function computeSquaredDistances(checked: CheckedUpdates): Float64Array {
  const { updates, tensorSizes } = checked;
  const n = updates.length;
  const distances = new Float64Array(n * n);
  for (let i = 0; i < n; i++) {
    for (let j = i + 1; j < n; j++) {
      let sum = 0;
      for (const name of tensorSizes.keys()) {
        const a = updates[i].deltas.get(name)!;
        const b = updates[j].deltas.get(name)!;
        for (let k = 0; k < a.length; k++) {
          const difference = a[k] - b[k];
          sum += difference * difference;
        }
      }
      distances[i * n + j] = sum;
      distances[j * n + i] = sum;
    }
  }
  return distances;
}

/** Returns the unweighted mean of `chosen`, summed in float64. */
function averageDeltas(
  chosen: readonly VehicleUpdate[],
  tensorSizes: ReadonlyMap<string, number>,
): WeightMap {
  const result: WeightMap = new Map();
  for (const [name, size] of tensorSizes) {
    const sums = new Float64Array(size);
    for (const update of chosen) {
      const values = update.deltas.get(name)!;
      for (let i = 0; i < size; i++) sums[i] += values[i];
    }
    const mean = new Float32Array(size);
    for (let i = 0; i < size; i++) mean[i] = sums[i] / chosen.length;
    result.set(name, mean);
  }
  return result;
}
