import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  type VehicleUpdate,
  aggregateMedian,
  aggregateTrimmedMean,
} from '../aggregator/strategies/index.ts';
import { createRandom } from '../models/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';

/** Update with tensor `w` and, when given, tensor `b`. */
function update(vehicleId: string, w: number[], b?: number[]): VehicleUpdate {
  const deltas = new Map([['w', Float32Array.from(w)]]);
  if (b !== undefined) deltas.set('b', Float32Array.from(b));
  return { vehicleId, numExamples: 10, deltas };
}

/** One-value updates v0, v1, ... from `values`. */
function scalars(values: number[]): VehicleUpdate[] {
  return values.map((value, k) => update(`v${k}`, [value]));
}

function isFleetError(code: string) {
  return (err: unknown) => err instanceof FleetError && err.code === code;
}

/** Tensor names and their bytes in hex, in map order. */
function bytesOf(tensors: Map<string, Float32Array>): string[] {
  return [...tensors].map(([name, values]) => {
    const bytes = Buffer.from(
      values.buffer,
      values.byteOffset,
      values.byteLength,
    );
    return `${name}:${bytes.toString('hex')}`;
  });
}

/** Seeded updates with two tensors, for order tests. */
function randomUpdates(count: number, seed: number): VehicleUpdate[] {
  const random = createRandom(seed);
  const values = (n: number) =>
    Array.from({ length: n }, () => (random() - 0.5) * 2);
  return Array.from({ length: count }, (_, k) =>
    update(`veh-${String(k).padStart(3, '0')}`, values(6), values(2)),
  );
}

function shuffled<T>(items: readonly T[], seed: number): T[] {
  const random = createRandom(seed);
  const copy = [...items];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [copy[i], copy[j]] = [copy[j], copy[i]];
  }
  return copy;
}

describe('aggregateMedian', () => {
  test('median of odd count', () => {
    const updates = [
      update('a', [1, 5, -2], [10]),
      update('b', [3, 4, 0], [30]),
      update('c', [2, 9, -1], [20]),
    ];

    const median = aggregateMedian(updates);

    // sorted columns: [1,2,3] [4,5,9] [-2,-1,0] and b: [10,20,30]
    assert.deepEqual([...median.get('w')!], [2, 5, -1]);
    assert.deepEqual([...median.get('b')!], [20]);
  });

  test('even count averages middle pair', () => {
    // sorted 1, 2, 4, 10: (2 + 4) / 2 = 3
    assert.deepEqual(
      [...aggregateMedian(scalars([10, 1, 4, 2])).get('w')!],
      [3],
    );
    // sorted -3, 0.5: (-3 + 0.5) / 2 = -1.25
    assert.deepEqual(
      [...aggregateMedian(scalars([0.5, -3])).get('w')!],
      [-1.25],
    );
  });

  test('median with tied values', () => {
    // odd: 2, 2, 5 gives 2; even: 1, 3, 3, 7 gives (3 + 3) / 2 = 3
    assert.deepEqual([...aggregateMedian(scalars([2, 5, 2])).get('w')!], [2]);
    assert.deepEqual(
      [...aggregateMedian(scalars([3, 7, 1, 3])).get('w')!],
      [3],
    );
  });

  test('single update is its median', () => {
    const median = aggregateMedian([update('a', [0.1, -7], [3])]);

    assert.deepEqual(median.get('w'), Float32Array.from([0.1, -7]));
    assert.deepEqual(median.get('b'), Float32Array.from([3]));
  });

  test('median ignores a huge outlier', () => {
    // sorted 1, 1.5, 1e30: 1.5
    assert.deepEqual(
      [...aggregateMedian(scalars([1e30, 1, 1.5])).get('w')!],
      [1.5],
    );
  });

  test('median rejects NaN and infinity', () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      // the bad value would sort into the middle or an end; it must throw
      const updates = [
        update('a', [1, 2], [0]),
        update('b', [3, 4], [0]),
        update('c', [2, 3], [bad]),
      ];

      assert.throws(
        () => aggregateMedian(updates),
        isFleetError(ErrorCode.NonFiniteValue),
        String(bad),
      );
    }
  });

  test('median same bytes any order', () => {
    const updates = randomUpdates(8, 7);

    const expected = bytesOf(aggregateMedian(updates));

    for (const seed of [1, 2, 3]) {
      const result = aggregateMedian(shuffled(updates, seed));
      assert.deepEqual(bytesOf(result), expected);
    }
  });

  test('median requires n >= 2f + 1', () => {
    assert.throws(
      () => aggregateMedian([]),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    // f = 2 needs 5 updates
    assert.throws(
      () => aggregateMedian(scalars([1, 2, 3, 4]), { byzantineCount: 2 }),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    assert.deepEqual(
      [
        ...aggregateMedian(scalars([1, 2, 3, 4, 5]), { byzantineCount: 2 }).get(
          'w',
        )!,
      ],
      [3],
    );
  });

  test('requirement message names n and f', () => {
    assert.throws(
      () => aggregateMedian(scalars([1, 2]), { byzantineCount: 1 }),
      (err: unknown) =>
        err instanceof FleetError &&
        /f = 1/.test(err.message) &&
        /n = 2/.test(err.message) &&
        /n >= 2f \+ 1/.test(err.message),
    );
  });

  test('bad byzantineCount rejected', () => {
    for (const f of [-1, 0.5, NaN]) {
      assert.throws(
        () => aggregateMedian(scalars([1]), { byzantineCount: f }),
        RangeError,
      );
    }
  });
});

describe('aggregateTrimmedMean', () => {
  test('trim count by hand', () => {
    const updates = [
      update('a', [1, -50]),
      update('b', [100, 3]),
      update('c', [3, 0]),
      update('d', [2, 2]),
      update('e', [4, 1]),
    ];

    const { deltas, trimCount } = aggregateTrimmedMean(updates, {
      trimCount: 1,
    });

    // [1,2,3,4,100] drop 1 and 100: (2 + 3 + 4) / 3 = 3
    // [-50,0,1,2,3] drop -50 and 3: (0 + 1 + 2) / 3 = 1
    assert.deepEqual([...deltas.get('w')!], [3, 1]);
    assert.equal(trimCount, 1);
  });

  test('trim fraction rounds down', () => {
    const values = [1, 2, 3, 4, 100];

    const third = aggregateTrimmedMean(scalars(values), { trimFraction: 0.3 });
    const tenth = aggregateTrimmedMean(scalars(values), { trimFraction: 0.1 });

    // floor(0.3 * 5) = 1: (2 + 3 + 4) / 3 = 3
    assert.equal(third.trimCount, 1);
    assert.deepEqual([...third.deltas.get('w')!], [3]);
    // floor(0.1 * 5) = 0, the plain mean: 110 / 5 = 22
    assert.equal(tenth.trimCount, 0);
    assert.deepEqual([...tenth.deltas.get('w')!], [22]);
  });

  test('trimmed mean of even count', () => {
    // sorted 1, 2, 6, 100 drop one each end: (2 + 6) / 2 = 4
    const { deltas } = aggregateTrimmedMean(scalars([6, 100, 1, 2]), {
      trimCount: 1,
    });

    assert.deepEqual([...deltas.get('w')!], [4]);
  });

  test('trimmed mean with ties', () => {
    // sorted 1, 5, 5, 5, 9: drop 1 and 9, mean of 5, 5, 5 = 5
    const { deltas } = aggregateTrimmedMean(scalars([5, 9, 5, 1, 5]), {
      trimCount: 1,
    });

    assert.deepEqual([...deltas.get('w')!], [5]);
  });

  test('zero trim is unweighted mean', () => {
    const updates = scalars([1, 2, 4]);
    updates[0] = { ...updates[0], numExamples: 1000 };

    const { deltas } = aggregateTrimmedMean(updates, { trimCount: 0 });

    // (1 + 2 + 4) / 3, whatever numExamples is
    assert.deepEqual([...deltas.get('w')!], [Math.fround(7 / 3)]);
  });

  test('trimmed mean requires n > 2 trim', () => {
    // trim 2 needs n > 4
    assert.throws(
      () => aggregateTrimmedMean(scalars([1, 2, 3, 4]), { trimCount: 2 }),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    assert.throws(
      () => aggregateTrimmedMean([], { trimCount: 0 }),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    const { deltas } = aggregateTrimmedMean(scalars([1, 2, 3, 4, 5]), {
      trimCount: 2,
    });
    assert.deepEqual([...deltas.get('w')!], [3]);
  });

  test('bad trim options rejected', () => {
    for (const trimFraction of [0.5, -0.1, NaN]) {
      assert.throws(
        () => aggregateTrimmedMean(scalars([1, 2, 3]), { trimFraction }),
        RangeError,
      );
    }
    for (const trimCount of [-1, 1.5]) {
      assert.throws(
        () => aggregateTrimmedMean(scalars([1, 2, 3]), { trimCount }),
        RangeError,
      );
    }
  });

  test('trimmed mean rejects infinity', () => {
    // +Infinity would be trimmed away, but it is rejected before sorting
    const updates = scalars([1, 2, 3, 4, Infinity]);

    assert.throws(
      () => aggregateTrimmedMean(updates, { trimCount: 1 }),
      isFleetError(ErrorCode.NonFiniteValue),
    );
  });

  test('trimmed mean same bytes any order', () => {
    const updates = randomUpdates(9, 11);

    const expected = bytesOf(
      aggregateTrimmedMean(updates, { trimCount: 2 }).deltas,
    );

    for (const seed of [4, 5, 6]) {
      const result = aggregateTrimmedMean(shuffled(updates, seed), {
        trimCount: 2,
      });
      assert.deepEqual(bytesOf(result.deltas), expected);
    }
  });
});

describe('update checks', () => {
  test('duplicate vehicle rejected', () => {
    const updates = [update('a', [1]), update('b', [2]), update('a', [3])];

    assert.throws(
      () => aggregateMedian(updates),
      isFleetError(ErrorCode.DuplicateUpdate),
    );
  });

  test('mismatched tensors rejected', () => {
    const cases: VehicleUpdate[][] = [
      [update('a', [1, 2]), update('b', [1])],
      [update('a', [1], [2]), update('b', [1])],
      [update('a', [1]), update('b', [1], [2])],
    ];

    for (const updates of cases) {
      assert.throws(() => aggregateMedian(updates), RangeError);
    }
  });

  test('bad numExamples rejected', () => {
    for (const numExamples of [0, -1, 2.5]) {
      const updates = [{ ...update('a', [1]), numExamples }];

      assert.throws(() => aggregateMedian(updates), RangeError);
    }
  });
});
