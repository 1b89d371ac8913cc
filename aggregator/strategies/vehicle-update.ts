/**
 * Input shared by the robust aggregation rules and the norm bound, and the
 * checks they all run before computing anything.
 *
 * Memory: FedAvg streams updates into one accumulator, but the robust rules
 * (median, trimmed mean, Krum, Multi-Krum) and the median-relative norm
 * bound need every update of the round at once. Holding them costs
 * n x model size x 4 bytes: the full gtsrb-cnn has 160,331 float32 values
 * (641 KB), so 100 vehicles hold 64 MB, and the default trainable tensors
 * (dense1 and dense2, 136,747 values) hold 55 MB. The rules themselves add
 * one float32 output of model size, and the coordinate-wise rules add one
 * scratch array of n values reused for every coordinate. Krum adds an
 * n x n float64 distance matrix (80 KB for n = 100).
 */
import { ErrorCode, FleetError } from '../../protocol/index.ts';

/** One vehicle's update as the robust rules receive it. */
export interface VehicleUpdate {
  vehicleId: string;
  /**
   * Local training examples. It is checked, but the robust rules do not
   * weight by it: the count is the vehicle's own claim, and weighting by a
   * claimed count would let one vehicle outweigh the others.
   */
  numExamples: number;
  /** Trained minus base values, per tensor name. */
  deltas: ReadonlyMap<string, Float32Array>;
}

/** Updates sorted by vehicle id, with the tensor layout they share. */
export interface CheckedUpdates {
  /** Sorted by vehicle id in UTF-16 code unit order, whatever the input. */
  updates: VehicleUpdate[];
  /** Element count per tensor name, in sorted name order. */
  tensorSizes: Map<string, number>;
}

/**
 * Throws FleetError ROBUST_RULE_UNSATISFIED with `message` unless
 * `isSatisfied`, so that the caller can fail the round cleanly.
 */
export function requireRule(isSatisfied: boolean, message: string): void {
  if (!isSatisfied) {
    throw new FleetError(ErrorCode.RobustRuleUnsatisfied, message);
  }
}

/**
 * Checks a count option such as f or a trim count.
 *
 * @throws {RangeError} unless `value` is a non-negative safe integer.
 */
export function checkCount(name: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`${name} must be an integer >= 0, got ${value}`);
  }
}

/** Compares strings by UTF-16 code units, independent of the locale. */
export function compareIds(a: string, b: string): number {
  if (a < b) return -1;
  return a > b ? 1 : 0;
}

/**
 * Returns a copy of `updates` sorted by vehicle id.
 *
 * @throws {FleetError} DUPLICATE_UPDATE when two updates share a vehicle id.
 * @throws {RangeError} for a numExamples that is not a positive safe integer.
 */
export function sortUpdates(
  updates: readonly VehicleUpdate[],
): VehicleUpdate[] {
  const sorted = [...updates].sort((a, b) =>
    compareIds(a.vehicleId, b.vehicleId),
  );
  for (let k = 0; k < sorted.length; k++) {
    const { vehicleId, numExamples } = sorted[k];
    if (k > 0 && sorted[k - 1].vehicleId === vehicleId) {
      throw new FleetError(
        ErrorCode.DuplicateUpdate,
        `two updates from vehicle ${vehicleId}; pass one update per vehicle`,
      );
    }
    if (!Number.isSafeInteger(numExamples) || numExamples <= 0) {
      throw new RangeError(
        `update from vehicle ${vehicleId} has numExamples ${numExamples}, ` +
          'expected a positive integer',
      );
    }
  }
  return sorted;
}

/** Location of the first NaN or infinite value, if any. */
export interface NonFiniteValue {
  tensorName: string;
  index: number;
  value: number;
}

/** Returns the first NaN or infinite value, in sorted tensor name order. */
export function findNonFinite(
  deltas: ReadonlyMap<string, Float32Array>,
): NonFiniteValue | undefined {
  for (const tensorName of [...deltas.keys()].sort(compareIds)) {
    const values = deltas.get(tensorName)!;
    const index = values.findIndex((value) => !Number.isFinite(value));
    if (index >= 0) return { tensorName, index, value: values[index] };
  }
  return undefined;
}

/** Builds the NON_FINITE_VALUE error for `found`, naming the vehicle. */
export function nonFiniteError(
  found: NonFiniteValue,
  vehicleId?: string,
): FleetError {
  const owner =
    vehicleId === undefined ? 'update' : `update from vehicle ${vehicleId}`;
  return new FleetError(
    ErrorCode.NonFiniteValue,
    `${owner} has ${found.value} in tensor ${found.tensorName} at index ` +
      `${found.index}; expected finite values`,
  );
}

/**
 * Sorts `updates` by vehicle id and checks that they all carry the same
 * tensors with the same sizes and only finite values. It runs before any
 * arithmetic, so a NaN can never take part in a sort or a median.
 *
 * @throws {FleetError} NON_FINITE_VALUE for a NaN or infinite value,
 *   DUPLICATE_UPDATE for a repeated vehicle id.
 * @throws {RangeError} for a bad numExamples, or tensors whose names or
 *   sizes differ from those of the first update in vehicle id order.
 */
export function checkUpdates(
  updates: readonly VehicleUpdate[],
): CheckedUpdates {
  const sorted = sortUpdates(updates);
  const tensorSizes = new Map<string, number>();
  if (sorted.length === 0) return { updates: sorted, tensorSizes };

  const first = sorted[0];
  for (const name of [...first.deltas.keys()].sort(compareIds)) {
    tensorSizes.set(name, first.deltas.get(name)!.length);
  }
  for (const update of sorted) {
    checkLayout(update, first.vehicleId, tensorSizes);
    const found = findNonFinite(update.deltas);
    if (found !== undefined) throw nonFiniteError(found, update.vehicleId);
  }
  return { updates: sorted, tensorSizes };
}

function checkLayout(
  update: VehicleUpdate,
  firstVehicleId: string,
  tensorSizes: ReadonlyMap<string, number>,
): void {
  const { vehicleId, deltas } = update;
  for (const [name, size] of tensorSizes) {
    const values = deltas.get(name);
    if (values === undefined) {
      throw new RangeError(
        `update from vehicle ${vehicleId} has no tensor ${name}, ` +
          `which vehicle ${firstVehicleId} sent`,
      );
    }
    if (values.length !== size) {
      throw new RangeError(
        `tensor ${name} from vehicle ${vehicleId} has ${values.length} ` +
          `values, expected ${size} as from vehicle ${firstVehicleId}`,
      );
    }
  }
  for (const name of deltas.keys()) {
    if (!tensorSizes.has(name)) {
      throw new RangeError(
        `update from vehicle ${vehicleId} has tensor ${name}, ` +
          `which vehicle ${firstVehicleId} did not send`,
      );
    }
  }
}
