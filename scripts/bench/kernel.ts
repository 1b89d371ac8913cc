/**
 * The aggregation kernel against a copy of the same bytes: FedAvg of
 * `updates` updates of `size` float32 values through FedAvgAccumulator
 * as the aggregator's rounds call it (`queue`, batched where the kernel
 * batches), the same sums with the WebAssembly and JavaScript kernels,
 * and TypedArray.set of every update into one buffer.
 */
import { FedAvgAccumulator } from '../../aggregator/fedavg.ts';
import { createExactSums } from '../../aggregator/kernel/index.ts';
import { createRandom } from '../../models/index.ts';
import {
  gigabytesPerSecond,
  timeOnce,
  timeRepeats,
  timingOf,
  type Timing,
} from './timing.ts';

export interface KernelOptions {
  updates: number;
  size: number;
  repeats: number;
  seed: number;
}

export interface KernelResult {
  updates: number;
  size: number;
  /** Update bytes each pass reads: updates * size * 4. */
  bytes: number;
  kernel: string;
  copy: Timing;
  /** FedAvgAccumulator.queue of every update and flush, checks included. */
  add: Timing;
  /** FedAvgAccumulator.result once all updates are in. */
  result: Timing;
  /** The same sums with the WebAssembly kernel, when it runs here. */
  wasmAdd?: Timing;
  /** The same sums with the JavaScript kernel. */
  jsAdd: Timing;
  copyGBps: number;
  addGBps: number;
  wasmAddGBps?: number;
  jsAddGBps: number;
  /** addGBps / copyGBps, measured in the same run. */
  addToCopyRatio: number;
}

/** Random deltas of about 0.01, like one local epoch's change. */
function randomUpdates(options: KernelOptions) {
  const random = createRandom(options.seed);
  return Array.from({ length: options.updates }, () => {
    const values = new Float32Array(options.size);
    for (let i = 0; i < values.length; i++) {
      values[i] = (random() + random() + random() - 1.5) * 0.02;
    }
    return { values, numExamples: 1 + Math.floor(random() * 5000) };
  });
}

/** Measures copy, kernel and JavaScript sums in alternation. */
export async function benchKernel(
  options: KernelOptions,
): Promise<KernelResult> {
  const updates = randomUpdates(options);
  const sizes = new Map([['w', options.size]]);
  const target = new Float32Array(options.size);
  let accumulator = new FedAvgAccumulator(sizes);

  // Untimed: V8 compiles the WebAssembly and the loops in tiers, and
  // needs some calls before the optimized code runs.
  const warmUp = new FedAvgAccumulator(sizes);
  for (const { values, numExamples } of updates.slice(0, 3)) {
    warmUp.queue(new Map([['w', values]]), numExamples);
    target.set(values);
  }
  warmUp.result();

  // Alternate copy and kernel so that both see the same machine state.
  const copy: number[] = [];
  const add: number[] = [];
  const result: number[] = [];
  for (let i = 0; i < options.repeats; i++) {
    copy.push(
      await timeOnce(() => {
        for (const { values } of updates) target.set(values);
      }),
    );
    accumulator = new FedAvgAccumulator(sizes);
    add.push(
      await timeOnce(() => {
        for (const { values, numExamples } of updates) {
          accumulator.queue(new Map([['w', values]]), numExamples);
        }
        accumulator.flush();
      }),
    );
    result.push(await timeOnce(() => accumulator.result()));
  }
  const sumsWith = (kernel: 'wasm-simd' | 'js') => () => {
    const sums = createExactSums([options.size], kernel);
    for (const { values, numExamples } of updates) {
      sums.add(0, values, numExamples, Infinity);
    }
  };
  const wasmAdd =
    accumulator.kernel === 'wasm-simd'
      ? undefined
      : await timeRepeats(options.repeats, sumsWith('wasm-simd'));
  const jsAdd = await timeRepeats(Math.min(options.repeats, 2), sumsWith('js'));

  const bytes = options.updates * options.size * 4;
  const copyTiming = timingOf(copy);
  const addTiming = timingOf(add);
  const copyGBps = gigabytesPerSecond(bytes, copyTiming.best);
  const addGBps = gigabytesPerSecond(bytes, addTiming.best);
  return {
    updates: options.updates,
    size: options.size,
    bytes,
    kernel: accumulator.kernel,
    copy: copyTiming,
    add: addTiming,
    result: timingOf(result),
    wasmAdd,
    jsAdd,
    copyGBps,
    addGBps,
    wasmAddGBps:
      wasmAdd === undefined
        ? undefined
        : gigabytesPerSecond(bytes, wasmAdd.best),
    jsAddGBps: gigabytesPerSecond(bytes, jsAdd.best),
    addToCopyRatio: addGBps / copyGBps,
  };
}
