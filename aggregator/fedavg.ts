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
 * The sums run in kernel/ on a native addon, WebAssembly SIMD or a
 * JavaScript loop, the first one available in that order. All three give
 * the same limbs.
 */
import { ErrorCode, FleetError } from '../protocol/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import { createExactSums, type ExactSums } from './kernel/index.ts';

export { applyDeltas } from '../models/weight-math.ts';

/** Largest numExamples of one update, so that delta * numExamples is exact. */
export const MAX_EXAMPLES_PER_ADD = 2 ** 26;
/** Largest |delta * numExamples| of one element. */
export const MAX_ABS_WEIGHTED_DELTA = 2 ** 36;
/** Largest number of updates, so that with the bound above sums stay below 2^53. */
export const MAX_UPDATES = 2 ** 16;

/** An update waiting in FedAvgAccumulator.queue for its batch. */
interface QueuedUpdate {
  deltas: ReadonlyMap<string, Float32Array>;
  numExamples: number;
}

/** Accumulates weighted deltas; `result()` returns their weighted mean. */
export class FedAvgAccumulator {
  readonly #sizes: ReadonlyMap<string, number>;
  readonly #sums: ExactSums;
  #totalExamples = 0;
  #count = 0;
  /** Updates queued for the next batched add, up to the batch size. */
  #pending: QueuedUpdate[] = [];
  /** Error of the first queued update whose values failed the check. */
  #queueFailure: RangeError | undefined;

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
    }
    this.#sizes = tensorSizes;
    this.#sums = createExactSums([...tensorSizes.values()]);
  }

  /** Implementation of the sums: 'native', 'wasm-simd' or 'js'. */
  get kernel(): ExactSums['kernel'] {
    return this.#sums.kernel;
  }

  /** Number of updates `queue` collects before it sums them in one pass. */
  get batchSize(): number {
    return this.#sums.batchSize;
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
    this.#checkShape(deltas, numExamples);
    this.#addChecked(deltas, numExamples);
    this.#totalExamples += numExamples;
    this.#count += 1;
  }

  /**
   * Adds an update whose values the caller has already checked, as the
   * aggregator's ingress does (every |value| * numExamples at most
   * MAX_ABS_WEIGHTED_DELTA). Where the kernel sums batches (the native
   * one), the update waits until `batchSize` updates are queued or
   * `flush` or `result` is called, and the caller must not change the
   * deltas until then. Otherwise it is added at once, as by `add`.
   *
   * The batch still checks every value. If a queued value fails that
   * check, the other updates are added, that one is left out, and
   * `result` throws its error, so a round fails instead of averaging it.
   *
   * @throws {RangeError} at once for the errors `add` reports, except
   *   bad values in a queued update.
   */
  queue(deltas: ReadonlyMap<string, Float32Array>, numExamples: number): void {
    if (this.#sums.batchSize <= 1) {
      this.add(deltas, numExamples);
      return;
    }
    this.#checkShape(deltas, numExamples);
    this.#pending.push({ deltas, numExamples });
    this.#totalExamples += numExamples;
    this.#count += 1;
    if (this.#pending.length >= this.#sums.batchSize) this.flush();
  }

  /**
   * Returns the weighted mean delta, sum(n_k * delta_k) / sum(n_k), as
   * float32 tensors; with `divisor`, the weighted sum divided by it.
   *
   * @throws {FleetError} EMPTY_AGGREGATE when no examples were added.
   * @throws {RangeError} for a divisor that is not a positive number, or
   *   the error of a queued update whose values failed the check.
   */
  result(divisor = this.#totalExamples): WeightMap {
    this.flush();
    if (this.#queueFailure !== undefined) throw this.#queueFailure;
    if (this.#totalExamples === 0) {
      throw new FleetError(
        ErrorCode.EmptyAggregate,
        'cannot average zero updates: the accumulator has 0 examples',
      );
    }
    if (!(divisor > 0) || !Number.isFinite(divisor)) {
      throw new RangeError(`divisor must be a positive number, got ${divisor}`);
    }
    const mean: WeightMap = new Map();
    let tensor = 0;
    for (const name of this.#sizes.keys()) {
      mean.set(name, this.#sums.divide(tensor, divisor));
      tensor += 1;
    }
    return mean;
  }

  /** Checks numExamples, the update count, tensor names and sizes. */
  #checkShape(
    deltas: ReadonlyMap<string, Float32Array>,
    numExamples: number,
  ): void {
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
    if (!this.#hasExpectedTensors(deltas)) {
      this.#checkTensors(deltas, numExamples);
    }
  }

  /**
   * Sums the queued updates now, in one batched add per tensor. `result`
   * calls it, so other callers need it only to time the sums. When a value
   * fails the check, the tensors already added are subtracted again. Then
   * the updates are added one by one, and `result` throws the failure.
   */
  flush(): void {
    const pending = this.#pending;
    if (pending.length === 0) return;
    this.#pending = [];
    const names = [...this.#sizes.keys()];
    const examples = Float64Array.from(pending, (entry) => entry.numExamples);
    const limits = examples.map((n) => MAX_ABS_WEIGHTED_DELTA / n);
    for (let tensor = 0; tensor < names.length; tensor++) {
      const values = pending.map((entry) => entry.deltas.get(names[tensor])!);
      const failure = this.#sums.addBatch(tensor, values, examples, limits);
      if (failure === -1) continue;
      for (let added = 0; added < tensor; added++) {
        for (const entry of pending) {
          const delta = entry.deltas.get(names[added])!;
          this.#sums.subtract(added, delta, entry.numExamples);
        }
      }
      this.#addOneByOne(pending);
      return;
    }
  }

  /**
   * Adds each update on its own and leaves out the ones that fail, storing
   * the first failure for `result` to throw.
   */
  #addOneByOne(updates: QueuedUpdate[]): void {
    for (const { deltas, numExamples } of updates) {
      try {
        this.#addChecked(deltas, numExamples);
      } catch (err) {
        this.#totalExamples -= numExamples;
        this.#count -= 1;
        this.#queueFailure ??= err as RangeError;
      }
    }
  }

  /**
   * Adds every tensor, checking values on the way. A bad value leaves the
   * sums as they were: tensors already added are subtracted again, which
   * is exact because the limbs are integers.
   */
  #addChecked(
    deltas: ReadonlyMap<string, Float32Array>,
    numExamples: number,
  ): void {
    const limit = MAX_ABS_WEIGHTED_DELTA / numExamples;
    const names = [...this.#sizes.keys()];
    for (let tensor = 0; tensor < names.length; tensor++) {
      const values = deltas.get(names[tensor])!;
      const index = this.#sums.add(tensor, values, numExamples, limit);
      if (index < 0) continue;
      for (let added = 0; added < tensor; added++) {
        this.#sums.subtract(added, deltas.get(names[added])!, numExamples);
      }
      throw invalidValueError(names[tensor], values, index, numExamples);
    }
  }

  /** True when deltas has exactly the expected tensors and sizes. */
  #hasExpectedTensors(deltas: ReadonlyMap<string, Float32Array>): boolean {
    if (deltas.size !== this.#sizes.size) return false;
    for (const [name, size] of this.#sizes) {
      if (deltas.get(name)?.length !== size) return false;
    }
    return true;
  }

  /**
   * Checks names, sizes and values in the original order and throws the
   * first error. Called only when the names or sizes are wrong, so it
   * always throws.
   */
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
        throw invalidValueError(name, values, index, numExamples);
      }
    }
    for (const name of deltas.keys()) {
      if (!this.#sizes.has(name)) {
        throw new RangeError(`update has unexpected tensor ${name}`);
      }
    }
  }
}

function invalidValueError(
  name: string,
  values: Float32Array,
  index: number,
  numExamples: number,
): RangeError {
  return new RangeError(
    `tensor ${name} value ${values[index]} at index ${index} times ` +
      `${numExamples} examples is not finite or above ` +
      `${MAX_ABS_WEIGHTED_DELTA}`,
  );
}
