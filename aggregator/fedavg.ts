/**
 * Streaming federated averaging (FedAvg): the new global delta is the mean
 * of the vehicles' deltas weighted by their numExamples. Updates are folded
 * into one float64 sum as they arrive, so memory is O(model size) whatever
 * the number of vehicles.
 */
import { ErrorCode, FleetError } from '../protocol/index.ts';
import type { WeightMap } from '../models/architecture.ts';

export { applyDeltas } from '../models/weight-math.ts';

/** Accumulates weighted deltas; `result()` returns their weighted mean. */
export class FedAvgAccumulator {
  readonly #sizes: ReadonlyMap<string, number>;
  readonly #sums = new Map<string, Float64Array>();
  #totalExamples = 0;
  #count = 0;

  /**
   * @param tensorSizes element count of each tensor an update must carry.
   * @throws {RangeError} when a size is not a positive integer.
   */
  constructor(tensorSizes: ReadonlyMap<string, number>) {
    for (const [name, size] of tensorSizes) {
      if (!Number.isSafeInteger(size) || size <= 0) {
        throw new RangeError(
          `tensor ${name} size must be a positive integer, got ${size}`,
        );
      }
      this.#sums.set(name, new Float64Array(size));
    }
    this.#sizes = tensorSizes;
  }

  /** Sum of numExamples over the added updates. */
  get totalExamples(): number {
    return this.#totalExamples;
  }

  /** Number of added updates. */
  get count(): number {
    return this.#count;
  }

  /**
   * Adds one update's deltas with weight `numExamples`. The update is
   * checked completely before anything is added, so a bad update leaves
   * the sums unchanged.
   *
   * @throws {RangeError} for a numExamples that is not a positive safe
   *   integer or that would make the total unsafe, a missing or extra
   *   tensor, or a tensor of the wrong size.
   */
  add(deltas: ReadonlyMap<string, Float32Array>, numExamples: number): void {
    if (!Number.isSafeInteger(numExamples) || numExamples <= 0) {
      throw new RangeError(
        `numExamples must be a positive integer, got ${numExamples}`,
      );
    }
    if (!Number.isSafeInteger(this.#totalExamples + numExamples)) {
      throw new RangeError(
        `numExamples ${numExamples} would raise the total of ` +
          `${this.#totalExamples} above ${Number.MAX_SAFE_INTEGER}`,
      );
    }
    this.#checkTensors(deltas);

    for (const [name, sum] of this.#sums) {
      addScaled(sum, deltas.get(name)!, numExamples);
    }
    this.#totalExamples += numExamples;
    this.#count += 1;
  }

  /**
   * Returns the weighted mean delta, sum(n_k * delta_k) / sum(n_k), as
   * float32 tensors.
   *
   * @throws {FleetError} EMPTY_AGGREGATE when no examples were added.
   */
  result(): WeightMap {
    if (this.#totalExamples === 0) {
      throw new FleetError(
        ErrorCode.EmptyAggregate,
        'cannot average zero updates: the accumulator has 0 examples',
      );
    }
    const mean: WeightMap = new Map();
    for (const [name, sum] of this.#sums) {
      const values = new Float32Array(sum.length);
      for (let i = 0; i < sum.length; i++) {
        values[i] = sum[i] / this.#totalExamples;
      }
      mean.set(name, values);
    }
    return mean;
  }

  #checkTensors(deltas: ReadonlyMap<string, Float32Array>): void {
    for (const [name, size] of this.#sizes) {
      const values = deltas.get(name);
      if (values === undefined) {
        throw new RangeError(`update has no tensor ${name}`);
      }
      if (values.length !== size) {
        throw new RangeError(
          `tensor ${name} has ${values.length} values, expected ${size}`,
        );
      }
    }
    for (const name of deltas.keys()) {
      if (!this.#sizes.has(name)) {
        throw new RangeError(`update has unexpected tensor ${name}`);
      }
    }
  }
}

function addScaled(
  sum: Float64Array,
  values: Float32Array,
  scale: number,
): void {
  for (let i = 0; i < sum.length; i++) sum[i] += values[i] * scale;
}
