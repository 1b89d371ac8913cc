/**
 * Exact weighted sums of float32 tensors, the kernel behind FedAvg. Each
 * product `value * numExamples` is split into three integer-valued
 * float64 limbs (see limb-module.ts), and the limbs are summed. Integer
 * sums below 2^53 are exact in any order, so the same updates give the
 * same bytes whatever their arrival order.
 *
 * Three implementations give identical limbs. The native addon
 * (AVX-512 or AVX2, see native-sums.ts) works on the caller's arrays where
 * it was built. WebAssembly SIMD runs two float64 lanes per instruction on
 * input staged through a small buffer in the module's memory. A plain
 * JavaScript loop serves runtimes without WebAssembly SIMD and models too
 * large for one 32-bit memory.
 */
import {
  addOneByOne,
  createLimbs,
  divideLimbs,
  LIMB_SCALE,
  type Limbs,
} from './limbs.ts';
import { NativeExactSums, nativeLimbAddon } from './native-sums.ts';
import {
  ELEMENTS_PER_STEP,
  STATE_BYTES_PER_ELEMENT,
  limbModule,
  type LimbExports,
} from './limb-module.ts';

const SCALE = LIMB_SCALE;

/** Float32 values staged per kernel call: 64 KiB, which stays in L2. */
const STAGING_ELEMENTS = 16_384;
const STAGING_BYTES = STAGING_ELEMENTS * 4;
const PAGE_BYTES = 65_536;
/** Pages of one wasm32 memory in V8: 4 GiB. */
const MAX_PAGES = 65_536;

/** Exact sums of several tensors, indexed as given to the constructor. */
export interface ExactSums {
  /** Implementation that runs the sums. */
  readonly kernel: ExactSumsKernel;
  /**
   * Adds `values * numExamples` to tensor `tensor` when every
   * |value| <= maxAbsValue, and returns -1. Otherwise leaves the sums
   * unchanged and returns the index of the first value that is larger or
   * not finite.
   */
  add(
    tensor: number,
    values: Float32Array,
    numExamples: number,
    maxAbsValue: number,
  ): number;
  /** Takes back exactly what a successful `add` with these arguments added. */
  subtract(tensor: number, values: Float32Array, numExamples: number): void;
  /**
   * Returns the sums of tensor `tensor` divided by `divisor`, rounded to
   * float32 as whole + (high + low / 2^26) / 2^26.
   */
  divide(tensor: number, divisor: number): Float32Array;
  /**
   * Updates that `addBatch` sums per pass over the state, or 1 when the
   * implementation has no batched add.
   */
  readonly batchSize: number;
  /**
   * Adds `values[k] * numExamples[k]` for every k to tensor `tensor` when
   * every |values[k][i]| <= maxAbsValues[k], and returns -1. Otherwise
   * leaves the sums unchanged and returns [k, i] of the first value, by
   * update then index, that is larger or not finite.
   */
  addBatch(
    tensor: number,
    values: readonly Float32Array[],
    numExamples: Float64Array,
    maxAbsValues: Float64Array,
  ): -1 | [number, number];
}

/** Implementations of ExactSums. */
export type ExactSumsKernel = 'native' | 'wasm-simd' | 'js';

/**
 * Creates sums for tensors of the given element counts. Without `kernel`
 * it picks the native addon where it was built for AVX2 or AVX-512, then
 * WebAssembly SIMD where the runtime has it and the model fits one
 * memory, and JavaScript otherwise.
 *
 * @throws {RangeError} when `kernel` is 'native' or 'wasm-simd' and
 *   cannot be used.
 */
export function createExactSums(
  sizes: readonly number[],
  kernel?: ExactSumsKernel,
): ExactSums {
  if (kernel === 'js') return new JsExactSums(sizes);
  if (kernel === undefined || kernel === 'native') {
    const { addon, reason } = nativeLimbAddon();
    if (addon !== null) return new NativeExactSums(addon, sizes);
    if (kernel === 'native') {
      throw new RangeError(`the native kernel cannot be used: ${reason}`);
    }
  }
  const module = limbModule();
  const pages = WasmExactSums.pagesFor(sizes);
  if (module !== null && pages <= MAX_PAGES) {
    return new WasmExactSums(module, sizes);
  }
  if (kernel === 'wasm-simd') {
    throw new RangeError(
      module === null
        ? 'the wasm-simd kernel needs WebAssembly SIMD, which this ' +
            'runtime cannot compile'
        : `the wasm-simd kernel needs ${pages} memory pages for these ` +
            `tensors, above the maximum of ${MAX_PAGES}`,
    );
  }
  return new JsExactSums(sizes);
}

/**
 * Returns the name of the kernel FedAvg sums run on, for logs: `native
 * (avx512f)`, or `wasm-simd` or `js` with the reason the native kernel is
 * not used.
 */
export function aggregationKernelName(): string {
  const { addon, reason } = nativeLimbAddon();
  if (addon !== null) return `native (${reason})`;
  return `${createExactSums([1]).kernel} (no native kernel: ${reason})`;
}

/** Index of the first |value| > maxAbsValue or not finite, from `start`. */
function firstInvalid(
  values: Float32Array,
  start: number,
  end: number,
  maxAbsValue: number,
): number {
  for (let i = start; i < end; i++) {
    if (!(Math.abs(values[i]) <= maxAbsValue)) return i;
  }
  return -1;
}

/**
 * Largest float32 at most `limit`, so that comparing float32 values with
 * it gives the same result as comparing them with the float64 `limit`.
 */
function float32AtMost(limit: number): number {
  const rounded = Math.fround(limit);
  if (rounded <= limit) return rounded;
  const bits = new Float32Array([rounded]);
  const view = new Int32Array(bits.buffer);
  view[0] += rounded > 0 ? -1 : 1;
  return bits[0];
}

function roundUp(value: number, multiple: number): number {
  return Math.ceil(value / multiple) * multiple;
}

class WasmExactSums implements ExactSums {
  readonly kernel = 'wasm-simd';
  readonly batchSize = 1;
  readonly #sizes: readonly number[];
  readonly #stateOffsets: number[] = [];
  readonly #exports: LimbExports;
  readonly #staging: Float32Array;
  readonly #state: Float64Array;

  /** Pages of memory for the staging buffer and every tensor's limbs. */
  static pagesFor(sizes: readonly number[]): number {
    let bytes = STAGING_BYTES;
    for (const size of sizes) {
      bytes += roundUp(size, ELEMENTS_PER_STEP) * STATE_BYTES_PER_ELEMENT;
    }
    return Math.ceil(bytes / PAGE_BYTES);
  }

  constructor(module: WebAssembly.Module, sizes: readonly number[]) {
    this.#sizes = sizes;
    let offset = STAGING_BYTES;
    for (const size of sizes) {
      this.#stateOffsets.push(offset);
      offset += roundUp(size, ELEMENTS_PER_STEP) * STATE_BYTES_PER_ELEMENT;
    }
    // A fresh memory is zero-filled, which is the empty sum.
    const memory = new WebAssembly.Memory({
      initial: WasmExactSums.pagesFor(sizes),
    });
    const instance = new WebAssembly.Instance(module, { env: { memory } });
    this.#exports = instance.exports as unknown as LimbExports;
    this.#staging = new Float32Array(memory.buffer, 0, STAGING_ELEMENTS);
    this.#state = new Float64Array(memory.buffer);
  }

  add(
    tensor: number,
    values: Float32Array,
    numExamples: number,
    maxAbsValue: number,
  ): number {
    const limit = float32AtMost(maxAbsValue);
    const state = this.#stateOffsets[tensor];
    for (let start = 0; start < values.length; start += STAGING_ELEMENTS) {
      const count = this.#stage(values, start);
      if (this.#exports.check(0, count, limit) !== 1) {
        const end = Math.min(start + STAGING_ELEMENTS, values.length);
        this.#run('subtract', state, values, numExamples, 0, start);
        return firstInvalid(values, start, end, maxAbsValue);
      }
      this.#exports.accumulate(
        0,
        state + start * STATE_BYTES_PER_ELEMENT,
        count,
        numExamples,
      );
    }
    return -1;
  }

  addBatch(
    tensor: number,
    values: readonly Float32Array[],
    numExamples: Float64Array,
    maxAbsValues: Float64Array,
  ): -1 | [number, number] {
    return addOneByOne(this, tensor, values, numExamples, maxAbsValues);
  }

  subtract(tensor: number, values: Float32Array, numExamples: number): void {
    const state = this.#stateOffsets[tensor];
    this.#run('subtract', state, values, numExamples, 0, values.length);
  }

  divide(tensor: number, divisor: number): Float32Array {
    const size = this.#sizes[tensor];
    const first = this.#stateOffsets[tensor] / 8;
    const state = this.#state;
    const quotient = new Float32Array(size);
    for (let i = 0; i < size; i++) {
      // 12 float64 per 4 elements; lanes of elements 2-3 follow those of 0-1.
      const at = first + (i >> 2) * 12 + ((i >> 1) & 1) * 6 + (i & 1);
      const whole = state[at];
      const high = state[at + 2];
      const low = state[at + 4];
      quotient[i] = (whole + (high + low / SCALE) / SCALE) / divisor;
    }
    return quotient;
  }

  /** Copies up to one staging buffer of values, zero-padded to a step. */
  #stage(values: Float32Array, start: number): number {
    const end = Math.min(start + STAGING_ELEMENTS, values.length);
    const count = end - start;
    this.#staging.set(values.subarray(start, end));
    const padded = roundUp(count, ELEMENTS_PER_STEP);
    if (padded > count) this.#staging.fill(0, count, padded);
    return padded;
  }

  #run(
    name: 'accumulate' | 'subtract',
    state: number,
    values: Float32Array,
    numExamples: number,
    from: number,
    to: number,
  ): void {
    for (let start = from; start < to; start += STAGING_ELEMENTS) {
      const count = this.#stage(values, start);
      this.#exports[name](
        0,
        state + start * STATE_BYTES_PER_ELEMENT,
        count,
        numExamples,
      );
    }
  }
}

class JsExactSums implements ExactSums {
  readonly kernel = 'js';
  readonly batchSize = 1;
  readonly #limbs: Limbs[];

  constructor(sizes: readonly number[]) {
    this.#limbs = sizes.map(createLimbs);
  }

  addBatch(
    tensor: number,
    values: readonly Float32Array[],
    numExamples: Float64Array,
    maxAbsValues: Float64Array,
  ): -1 | [number, number] {
    return addOneByOne(this, tensor, values, numExamples, maxAbsValues);
  }

  add(
    tensor: number,
    values: Float32Array,
    numExamples: number,
    maxAbsValue: number,
  ): number {
    const invalid = firstInvalid(values, 0, values.length, maxAbsValue);
    if (invalid >= 0) return invalid;
    addLimbs(this.#limbs[tensor], values, numExamples, 1);
    return -1;
  }

  subtract(tensor: number, values: Float32Array, numExamples: number): void {
    addLimbs(this.#limbs[tensor], values, numExamples, -1);
  }

  divide(tensor: number, divisor: number): Float32Array {
    return divideLimbs(this.#limbs[tensor], divisor);
  }
}

/**
 * Adds (sign 1) or subtracts (sign -1) the limbs of values * numExamples.
 * The sign multiplies the per-update factor only, so the inner loop stays
 * as fast as a plain add.
 */
function addLimbs(
  limbs: Limbs,
  values: Float32Array,
  numExamples: number,
  sign: 1 | -1,
): void {
  const { whole, high, low } = limbs;
  const length = values.length;
  for (let i = 0; i < length; i++) {
    const product = values[i] * numExamples;
    const wholePart = Math.trunc(product);
    const fraction = (product - wholePart) * SCALE;
    const highPart = Math.trunc(fraction);
    const lowPart = Math.round((fraction - highPart) * SCALE);
    if (sign === 1) {
      whole[i] += wholePart;
      high[i] += highPart;
      low[i] += lowPart;
    } else {
      whole[i] -= wholePart;
      high[i] -= highPart;
      low[i] -= lowPart;
    }
  }
}
