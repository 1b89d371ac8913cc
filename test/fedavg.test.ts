import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  FedAvgAccumulator,
  MAX_EXAMPLES_PER_ADD,
  MAX_UPDATES,
  applyDeltas,
} from '../aggregator/fedavg.ts';
import { checkFinite } from '../aggregator/versions.ts';
import { createRandom } from '../models/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';

const SIZES = new Map([
  ['a', 3],
  ['b', 1],
]);

function deltas(a: number[], b: number[]): Map<string, Float32Array> {
  return new Map([
    ['a', Float32Array.from(a)],
    ['b', Float32Array.from(b)],
  ]);
}

describe('FedAvgAccumulator', () => {
  test('fedavg weights by numExamples', () => {
    const accumulator = new FedAvgAccumulator(SIZES);

    accumulator.add(deltas([1, 2, 3], [10]), 1);
    accumulator.add(deltas([4, 5, 6], [-2]), 3);
    const mean = accumulator.result();

    // a: (1*1 + 3*4) / 4 = 3.25, (1*2 + 3*5) / 4 = 4.25, (3 + 18) / 4 = 5.25
    assert.deepEqual([...mean.get('a')!], [3.25, 4.25, 5.25]);
    // b: (1*10 + 3*(-2)) / 4 = 1
    assert.deepEqual([...mean.get('b')!], [1]);
    assert.equal(accumulator.totalExamples, 4);
    assert.equal(accumulator.count, 2);
  });

  test('single update is its own mean', () => {
    const accumulator = new FedAvgAccumulator(SIZES);

    accumulator.add(deltas([0.5, -0.25, 0], [7]), 42);

    assert.deepEqual([...accumulator.result().get('a')!], [0.5, -0.25, 0]);
    assert.deepEqual([...accumulator.result().get('b')!], [7]);
  });

  test('three vehicles exact weighted mean', () => {
    const accumulator = new FedAvgAccumulator(new Map([['w', 2]]));

    accumulator.add(new Map([['w', Float32Array.from([0.01, 1])]]), 10);
    accumulator.add(new Map([['w', Float32Array.from([0.02, 2])]]), 20);
    accumulator.add(new Map([['w', Float32Array.from([0.04, 4])]]), 30);
    const mean = accumulator.result().get('w')!;

    // (10*0.01 + 20*0.02 + 30*0.04) / 60 = 1.7 / 60 = 0.028333...
    assert.ok(Math.abs(mean[0] - 1.7 / 60) < 1e-8);
    // (10 + 40 + 120) / 60 = 2.8333...
    assert.ok(Math.abs(mean[1] - 170 / 60) < 1e-6);
  });

  test('empty aggregate throws EMPTY_AGGREGATE', () => {
    const accumulator = new FedAvgAccumulator(SIZES);

    assert.throws(
      () => accumulator.result(),
      (err: unknown) =>
        err instanceof FleetError && err.code === ErrorCode.EmptyAggregate,
    );
  });

  test('zero examples rejected', () => {
    const accumulator = new FedAvgAccumulator(SIZES);

    assert.throws(() => accumulator.add(deltas([1, 2, 3], [4]), 0), RangeError);
    assert.throws(
      () => accumulator.add(deltas([1, 2, 3], [4]), 1.5),
      RangeError,
    );
    assert.equal(accumulator.totalExamples, 0);
  });

  test('bad tensor leaves sums unchanged', () => {
    const accumulator = new FedAvgAccumulator(SIZES);
    accumulator.add(deltas([1, 1, 1], [1]), 2);

    assert.throws(() => accumulator.add(deltas([9, 9], [9]), 5), RangeError);
    assert.throws(
      () => accumulator.add(new Map([['a', new Float32Array(3)]]), 5),
      RangeError,
    );
    const extra = deltas([9, 9, 9], [9]);
    extra.set('c', new Float32Array(1));
    assert.throws(() => accumulator.add(extra, 5), RangeError);

    assert.equal(accumulator.totalExamples, 2);
    assert.deepEqual([...accumulator.result().get('a')!], [1, 1, 1]);
  });

  test('oversized example count rejected', () => {
    const accumulator = new FedAvgAccumulator(SIZES);
    accumulator.add(deltas([1, 1, 1], [1]), MAX_EXAMPLES_PER_ADD);

    assert.throws(
      () => accumulator.add(deltas([1, 1, 1], [1]), MAX_EXAMPLES_PER_ADD + 1),
      /numExamples must be an integer in 1\.\.67108864, got 67108865/,
    );

    assert.equal(accumulator.totalExamples, MAX_EXAMPLES_PER_ADD);
    assert.equal(accumulator.count, 1);
  });

  test('non-finite or huge value rejected', () => {
    const accumulator = new FedAvgAccumulator(SIZES);

    assert.throws(
      () => accumulator.add(deltas([1, Number.NaN, 1], [1]), 2),
      /tensor a value NaN at index 1/,
    );
    assert.throws(
      () => accumulator.add(deltas([1, 1, 1], [2 ** 31]), 64),
      /tensor b value 2147483648 at index 0 times 64 examples/,
    );

    assert.equal(accumulator.count, 0);
  });

  test('arrival order leaves bytes unchanged', () => {
    const random = createRandom(7);
    const updates = Array.from({ length: 24 }, () => ({
      values: Float32Array.from(
        { length: 500 },
        () => (random() - 0.5) * 10 ** Math.floor(random() * 8 - 6),
      ),
      numExamples: 1 + Math.floor(random() * 5000),
    }));
    const aggregate = (order: number[]): Uint8Array => {
      const accumulator = new FedAvgAccumulator(new Map([['w', 500]]));
      for (const index of order) {
        const { values, numExamples } = updates[index];
        accumulator.add(new Map([['w', values]]), numExamples);
      }
      return new Uint8Array(accumulator.result().get('w')!.buffer);
    };
    const forward = updates.map((_, index) => index);
    const reference = aggregate(forward);

    for (let trial = 0; trial < 20; trial++) {
      const order = [...forward].sort(() => random() - 0.5);
      assert.deepEqual(aggregate(order), reference);
    }
    assert.deepEqual(aggregate([...forward].reverse()), reference);
  });

  test('exact sums match float64 mean', () => {
    const random = createRandom(11);
    const accumulator = new FedAvgAccumulator(new Map([['w', 1000]]));
    const sums = new Float64Array(1000);
    let total = 0;
    for (let k = 0; k < 50; k++) {
      const values = Float32Array.from(
        { length: 1000 },
        () => (random() - 0.5) * 1e-3,
      );
      const numExamples = 1 + Math.floor(random() * 1000);
      accumulator.add(new Map([['w', values]]), numExamples);
      values.forEach((value, i) => (sums[i] += value * numExamples));
      total += numExamples;
    }
    const mean = accumulator.result().get('w')!;

    for (let i = 0; i < mean.length; i++) {
      const expected = Math.fround(sums[i] / total);
      assert.ok(
        Math.abs(mean[i] - expected) <= Math.abs(expected) * 2 ** -22,
        `element ${i}: ${mean[i]} against ${expected}`,
      );
    }
  });

  test('invalid tensor size rejected', () => {
    assert.throws(() => new FedAvgAccumulator(new Map([['a', 0]])), RangeError);
  });

  // Adds the largest whole part (2^36), a fraction just above -1 and a
  // half at 2^-53, MAX_UPDATES times. The fraction sum then reaches about
  // 2^68 units of 2^-52, beyond any 64-bit integer, and must stay exact.
  test('sums stay exact up to MAX_UPDATES', () => {
    const accumulator = new FedAvgAccumulator(new Map([['w', 3]]));
    const values = Float32Array.from([2 ** 36, -(1 - 2 ** -24), 2 ** -53]);

    for (let k = 0; k < MAX_UPDATES; k++) {
      accumulator.add(new Map([['w', values]]), 1);
    }
    const mean = accumulator.result().get('w')!;

    // Each product is rounded half up to a multiple of 2^-52 before it is
    // summed, so 2^-53 counts as 2^-52.
    assert.deepEqual([...mean], [2 ** 36, -(1 - 2 ** -24), 2 ** -52]);
    assert.throws(
      () => accumulator.add(new Map([['w', values]]), 1),
      (err: unknown) =>
        err instanceof RangeError &&
        err.message ===
          `cannot add more than ${MAX_UPDATES} updates to one aggregate`,
    );
    assert.equal(accumulator.count, MAX_UPDATES);
  });
});

describe('applyDeltas', () => {
  test('adds deltas to named tensors', () => {
    const frozen = Float32Array.from([5, 6]);
    const weights = new Map([
      ['a', Float32Array.from([1, 2, 3])],
      ['frozen', frozen],
    ]);

    const next = applyDeltas(
      weights,
      new Map([['a', Float32Array.from([0.5, -1, 0])]]),
    );

    assert.deepEqual([...next.get('a')!], [1.5, 1, 3]);
    assert.equal(next.get('frozen'), frozen);
    assert.deepEqual([...weights.get('a')!], [1, 2, 3]);
  });

  test('unknown or resized tensor rejected', () => {
    const weights = new Map([['a', new Float32Array(2)]]);

    assert.throws(
      () => applyDeltas(weights, new Map([['x', new Float32Array(2)]])),
      RangeError,
    );
    assert.throws(
      () => applyDeltas(weights, new Map([['a', new Float32Array(3)]])),
      RangeError,
    );
  });
});

describe('checkFinite', () => {
  test('finite weights pass', () => {
    assert.doesNotThrow(() => checkFinite(deltas([1, -2, 3e38], [0]), 4));
  });

  test('overflowed weight names tensor', () => {
    const isNonFinite = (err: unknown): boolean =>
      err instanceof FleetError &&
      err.code === ErrorCode.NonFiniteValue &&
      /version 4/.test(err.message) &&
      /tensor b at index 0/.test(err.message);

    assert.throws(
      () => checkFinite(deltas([1, 2, 3], [Number.NaN]), 4),
      isNonFinite,
    );
    assert.throws(
      () => checkFinite(deltas([1, 2, 3], [Infinity]), 4),
      isNonFinite,
    );
  });
});
