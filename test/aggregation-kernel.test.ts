import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  FedAvgAccumulator,
  MAX_ABS_WEIGHTED_DELTA,
} from '../aggregator/fedavg.ts';
import {
  createExactSums,
  nativeLimbAddon,
  type ExactSumsKernel,
} from '../aggregator/kernel/index.ts';
import { createRandom } from '../models/index.ts';
import {
  bytesOf,
  plan,
  randomUpdate,
  referenceMean,
} from './kernel-fixtures.ts';

const KERNELS: ExactSumsKernel[] =
  nativeLimbAddon().addon === null
    ? ['wasm-simd', 'js']
    : ['native', 'wasm-simd', 'js'];

function meanOf(
  kernel: ExactSumsKernel,
  updates: { values: Float32Array; numExamples: number }[],
): Float32Array {
  const sums = createExactSums([updates[0].values.length], kernel);
  let total = 0;
  for (const { values, numExamples } of updates) {
    const limit = MAX_ABS_WEIGHTED_DELTA / numExamples;
    assert.equal(sums.add(0, values, numExamples, limit), -1);
    total += numExamples;
  }
  return sums.divide(0, total);
}

describe('exact sums kernel', () => {
  test('wasm-simd runs on this runtime', () => {
    const accumulator = new FedAvgAccumulator(new Map([['w', 10]]));

    assert.equal(createExactSums([10], 'wasm-simd').kernel, 'wasm-simd');
    assert.equal(
      accumulator.kernel,
      nativeLimbAddon().addon === null ? 'wasm-simd' : 'native',
    );
  });

  for (const kernel of KERNELS) {
    for (const size of [1, 3, 4, 7, 16_385, 40_000]) {
      test(`${kernel} matches reference, size ${size}`, () => {
        const updates = plan(size, size, 12);

        const mean = meanOf(kernel, updates);

        assert.ok(bytesOf(mean).equals(bytesOf(referenceMean(updates))));
      });
    }
  }

  // With only tiny values the mean depends on the low limbs, which the
  // float32 rounding of larger means hides.
  for (const kernel of KERNELS) {
    test(`${kernel} matches reference on tiny values`, () => {
      const updates = plan(21, 9_999, 12, [-75, -20]);

      const mean = meanOf(kernel, updates);

      assert.ok(bytesOf(mean).equals(bytesOf(referenceMean(updates))));
    });
  }

  test('kernels agree on cancelling deltas', () => {
    const random = createRandom(7);
    const big = Float32Array.from({ length: 999 }, (_, i) => 999 - (i % 7));
    const updates = [
      { values: big, numExamples: 1_000_000 },
      { values: big.map((value) => -value), numExamples: 1_000_000 },
      { values: randomUpdate(999, 20, random), numExamples: 20 },
      { values: randomUpdate(999, 33, random), numExamples: 33 },
    ];
    const expected = bytesOf(referenceMean(updates));

    for (const kernel of KERNELS) {
      assert.ok(bytesOf(meanOf(kernel, updates)).equals(expected), kernel);
    }
  });

  test('arrival order gives identical bytes', () => {
    const updates = plan(11, 20_003, 9);
    const reversed = [...updates].reverse();
    const interleaved = updates.filter((_, i) => i % 2 === 1);
    interleaved.push(...updates.filter((_, i) => i % 2 === 0));

    for (const kernel of KERNELS) {
      const forward = bytesOf(meanOf(kernel, updates));
      assert.ok(forward.equals(bytesOf(meanOf(kernel, reversed))), kernel);
      assert.ok(forward.equals(bytesOf(meanOf(kernel, interleaved))), kernel);
    }
  });

  // A kernel that keeps the fraction sums in 64-bit integers must carry
  // them into another limb, because 2^11 fractions near 1 (2^52 units of
  // 2^-52 each) reach 2^63. More updates must still give the same bytes.
  test('kernels match reference past 2048 updates', () => {
    const updates = plan(13, 16, 3_000);
    for (const { values } of updates) {
      values[0] = 1 - 2 ** -24;
      values[1] = -(1 - 2 ** -24);
    }
    const expected = bytesOf(referenceMean(updates));

    for (const kernel of KERNELS) {
      assert.ok(bytesOf(meanOf(kernel, updates)).equals(expected), kernel);
      const reversed = [...updates].reverse();
      assert.ok(bytesOf(meanOf(kernel, reversed)).equals(expected), kernel);
    }
  });

  test('subtract restores the sums exactly', () => {
    const [first, second] = plan(5, 17_001, 2);

    for (const kernel of KERNELS) {
      const sums = createExactSums([17_001], kernel);
      sums.add(0, first.values, first.numExamples, Infinity);
      sums.add(0, second.values, second.numExamples, Infinity);
      sums.subtract(0, second.values, second.numExamples);

      const expected = referenceMean([first]);
      const actual = sums.divide(0, first.numExamples);
      assert.ok(bytesOf(actual).equals(bytesOf(expected)), kernel);
    }
  });

  test('wasm-simd rejects memory above 4 GiB', () => {
    assert.throws(
      () => createExactSums([2 ** 28], 'wasm-simd'),
      (err: unknown) =>
        err instanceof RangeError && /memory pages/.test(err.message),
    );
  });
});

describe('FedAvgAccumulator on the kernel', () => {
  const SIZES = new Map([
    ['a', 20_000],
    ['b', 40_001],
  ]);

  function deltasOf(seed: number, numExamples: number) {
    const random = createRandom(seed);
    return new Map(
      [...SIZES].map(([name, size]) => [
        name,
        randomUpdate(size, numExamples, random),
      ]),
    );
  }

  test('bad value leaves sums unchanged', () => {
    const good = deltasOf(1, 10);
    const bad = deltasOf(2, 10);
    bad.get('b')![35_000] = Number.NaN;
    const clean = new FedAvgAccumulator(SIZES);
    clean.add(good, 10);

    const accumulator = new FedAvgAccumulator(SIZES);
    accumulator.add(good, 10);
    assert.throws(
      () => accumulator.add(bad, 10),
      (err: unknown) =>
        err instanceof RangeError &&
        err.message.includes('tensor b value NaN at index 35000'),
    );

    assert.equal(accumulator.count, 1);
    assert.equal(accumulator.totalExamples, 10);
    for (const name of SIZES.keys()) {
      const expected = bytesOf(clean.result().get(name)!);
      assert.ok(bytesOf(accumulator.result().get(name)!).equals(expected));
    }
  });

  test('value above limit names first index', () => {
    const deltas = deltasOf(3, 4);
    deltas.get('a')![19_999] = MAX_ABS_WEIGHTED_DELTA;
    deltas.get('a')![17_000] = -Infinity;
    const accumulator = new FedAvgAccumulator(SIZES);

    assert.throws(
      () => accumulator.add(deltas, 4),
      (err: unknown) =>
        err instanceof RangeError &&
        err.message.includes('tensor a value -Infinity at index 17000'),
    );
  });

  test('value error precedes later missing tensor', () => {
    const deltas = deltasOf(4, 2);
    deltas.get('a')![5] = Number.POSITIVE_INFINITY;
    deltas.delete('b');
    const accumulator = new FedAvgAccumulator(SIZES);

    assert.throws(
      () => accumulator.add(deltas, 2),
      (err: unknown) =>
        err instanceof RangeError &&
        err.message.includes('tensor a value Infinity at index 5'),
    );
  });

  test('extra tensor rejected after values pass', () => {
    const deltas = deltasOf(5, 2);
    deltas.set('c', new Float32Array(3));
    const accumulator = new FedAvgAccumulator(SIZES);

    assert.throws(
      () => accumulator.add(deltas, 2),
      (err: unknown) =>
        err instanceof RangeError && /unexpected tensor c/.test(err.message),
    );
    assert.equal(accumulator.count, 0);
  });

  test('mean matches reference per tensor', () => {
    const accumulator = new FedAvgAccumulator(SIZES);
    const updates = [
      { deltas: deltasOf(6, 3), numExamples: 3 },
      { deltas: deltasOf(7, 1000), numExamples: 1000 },
      { deltas: deltasOf(8, 1), numExamples: 1 },
    ];

    for (const { deltas, numExamples } of updates) {
      accumulator.add(deltas, numExamples);
    }
    const mean = accumulator.result();

    for (const name of SIZES.keys()) {
      const expected = referenceMean(
        updates.map(({ deltas, numExamples }) => ({
          values: deltas.get(name)!,
          numExamples,
        })),
      );
      assert.ok(bytesOf(mean.get(name)!).equals(bytesOf(expected)), name);
    }
  });
});
