/**
 * Streaming federated averaging (FedAvg): the new global delta is the mean
 * of the vehicles' deltas weighted by their numExamples. Updates are folded
 * into running sums as they arrive, so memory is O(model size) whatever
 * the number of vehicles.
 *
 * The sums are exact, so the result does not depend on the order in which
 * updates arrive: the same updates give the same bytes. Each product
 * `delta * numExamples` is exact in float64 (24 significant bits times at
 * most 26), and it is split into three integer parts at fixed scales:
 * the integer part, then two 26-bit fractional parts. Integer sums below
 * 2^53 are exact in float64 whatever the order. The split drops the part
 * of each product below 2^-52, far below the float32 resolution of the mean.
 */
import { ErrorCode, FleetError } from '../protocol/index.ts';
import type { WeightMap } from '../models/architecture.ts';

export { applyDeltas } from '../models/weight-math.ts';

/** Largest numExamples of one update, so that delta * numExamples is exact. */
export const MAX_EXAMPLES_PER_ADD = 2 ** 26;
/** Largest |delta * numExamples| of one element. */
export const MAX_ABS_WEIGHTED_DELTA = 2 ** 36;
/** Largest number of updates, so that with the bound above sums stay below 2^53. */
export const MAX_UPDATES = 2 ** 16;

const SCALE = 2 ** 26;

/** Exact sums of one tensor: integer part and two fractional parts. */
interface LimbSums {
  whole: Float64Array;
  high: Float64Array;
  low: Float64Array;
}

/** Accumulates weighted deltas; `result()` returns their weighted mean. */
export class FedAvgAccumulator {
  readonly #sizes: ReadonlyMap<string, number>;
  readonly #sums = new Map<string, LimbSums>();
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
      this.#sums.set(name, {
        whole: new Float64Array(size),
        high: new Float64Array(size),
        low: new Float64Array(size),
      });
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
   * @throws {RangeError} for a numExamples that is not an integer in
   *   1..MAX_EXAMPLES_PER_ADD, more than MAX_UPDATES updates, a missing or
   *   extra tensor, a tensor of the wrong size, or a value that is not
   *   finite or whose product with numExamples exceeds
   *   MAX_ABS_WEIGHTED_DELTA.
   */
  add(deltas: ReadonlyMap<string, Float32Array>, numExamples: number): void {
    if (
      !Number.isSafeInteger(numExamples) ||
      numExamples <= 0 ||
      numExamples > MAX_EXAMPLES_PER_ADD
    ) {
      throw new RangeError(
        `numExamples must be an integer in 1..${MAX_EXAMPLES_PER_ADD}, ` +
          `got ${numExamples}`,
      );
    }
    if (this.#count >= MAX_UPDATES) {
      throw new RangeError(
        `cannot add more than ${MAX_UPDATES} updates to one aggregate`,
      );
    }
    this.#checkTensors(deltas, numExamples);

    for (const [name, sums] of this.#sums) {
      addExact(sums, deltas.get(name)!, numExamples);
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
    for (const [name, { whole, high, low }] of this.#sums) {
      const values = new Float32Array(whole.length);
      for (let i = 0; i < whole.length; i++) {
        const sum = whole[i] + (high[i] + low[i] / SCALE) / SCALE;
        values[i] = sum / this.#totalExamples;
      }
      mean.set(name, values);
    }
    return mean;
  }

  #checkTensors(
    deltas: ReadonlyMap<string, Float32Array>,
    numExamples: number,
  ): void {
    const limit = MAX_ABS_WEIGHTED_DELTA / numExamples;
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
      const index = values.findIndex((value) => !(Math.abs(value) <= limit));
      if (index >= 0) {
        throw new RangeError(
          `tensor ${name} value ${values[index]} at index ${index} times ` +
            `${numExamples} examples is not finite or above ` +
            `${MAX_ABS_WEIGHTED_DELTA}`,
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

/** Adds values * numExamples to the sums, exactly. */
function addExact(
  sums: LimbSums,
  values: Float32Array,
  numExamples: number,
): void {
  const { whole, high, low } = sums;
  for (let i = 0; i < values.length; i++) {
    const product = values[i] * numExamples;
    const wholePart = Math.trunc(product);
    const fraction = (product - wholePart) * SCALE;
    const highPart = Math.trunc(fraction);
    whole[i] += wholePart;
    high[i] += highPart;
    low[i] += Math.round((fraction - highPart) * SCALE);
  }
}
