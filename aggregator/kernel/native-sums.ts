/**
 * ExactSums on the native addon built from aggregator/kernel/native/ by
 * `npm run build:native` (node-gyp, run by `npm ci`). The addon works on
 * the caller's typed arrays in place, without a copy, and computes the
 * same limbs as the JavaScript loop bit for bit. Its batched add sums the
 * limbs of up to 8 updates in registers before it touches the state. The
 * limbs are integers whose partial sums stay below 2^53, so the order does
 * not change the result.
 */
import { createRequire } from 'node:module';

import type { ExactSums } from './exact-sums.ts';
import { addOneByOne, createLimbs, divideLimbs, type Limbs } from './limbs.ts';

/** Functions of build/Release/limbs.node. */
interface LimbAddon {
  addSeparate(
    whole: Float64Array,
    high: Float64Array,
    low: Float64Array,
    values: Float32Array,
    numExamples: number,
    maxAbsValue: number,
  ): number;
  subtractSeparate(
    whole: Float64Array,
    high: Float64Array,
    low: Float64Array,
    values: Float32Array,
    numExamples: number,
  ): void;
  addBatchRegisters(
    whole: Float64Array,
    high: Float64Array,
    low: Float64Array,
    updates: readonly Float32Array[],
    numExamples: Float64Array,
    maxAbsValues: Float64Array,
  ): -1 | [number, number];
  /**
   * Instruction set of the kernels picked for this CPU: 'avx512f', 'avx2'
   * or 'baseline'.
   */
  instructionSet(): string;
}

/** Updates per batched add: the register batch, MAX_CHUNK in kernels.cc. */
const NATIVE_BATCH_SIZE = 8;

const ADDON_PATH = '../../build/Release/limbs.node';

let loaded: { addon: LimbAddon | null; reason: string } | undefined;

/**
 * Loads the addon once and caches the outcome. Returns a null addon with
 * the reason when it fails to load or would only run baseline x86-64 code,
 * which is slower than the WebAssembly kernel. Otherwise the reason is the
 * instruction set.
 */
export function nativeLimbAddon(): { addon: LimbAddon | null; reason: string } {
  if (loaded !== undefined) return loaded;
  try {
    const addon = createRequire(import.meta.url)(ADDON_PATH) as LimbAddon;
    const instructionSet = addon.instructionSet();
    loaded =
      instructionSet === 'baseline'
        ? {
            addon: null,
            reason: 'this CPU has neither AVX2 nor AVX-512',
          }
        : { addon, reason: instructionSet };
  } catch (err) {
    loaded = {
      addon: null,
      reason:
        `the addon failed to load (${(err as Error).message.split('\n')[0]}); ` +
        'build it with npm run build:native',
    };
  }
  return loaded;
}

export class NativeExactSums implements ExactSums {
  readonly kernel = 'native';
  readonly batchSize = NATIVE_BATCH_SIZE;
  readonly #addon: LimbAddon;
  readonly #limbs: Limbs[];

  constructor(addon: LimbAddon, sizes: readonly number[]) {
    this.#addon = addon;
    this.#limbs = sizes.map(createLimbs);
  }

  add(
    tensor: number,
    values: Float32Array,
    numExamples: number,
    maxAbsValue: number,
  ): number {
    const { whole, high, low } = this.#limbs[tensor];
    return this.#addon.addSeparate(
      whole,
      high,
      low,
      values,
      numExamples,
      maxAbsValue,
    );
  }

  subtract(tensor: number, values: Float32Array, numExamples: number): void {
    const { whole, high, low } = this.#limbs[tensor];
    this.#addon.subtractSeparate(whole, high, low, values, numExamples);
  }

  addBatch(
    tensor: number,
    values: readonly Float32Array[],
    numExamples: Float64Array,
    maxAbsValues: Float64Array,
  ): -1 | [number, number] {
    if (values.length === 0) return -1;
    if (values.some((update) => update.length !== values[0].length)) {
      return addOneByOne(this, tensor, values, numExamples, maxAbsValues);
    }
    const { whole, high, low } = this.#limbs[tensor];
    return this.#addon.addBatchRegisters(
      whole,
      high,
      low,
      values,
      numExamples,
      maxAbsValues,
    );
  }

  divide(tensor: number, divisor: number): Float32Array {
    return divideLimbs(this.#limbs[tensor], divisor);
  }
}
