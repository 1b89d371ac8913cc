import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  type VehicleUpdate,
  aggregateKrum,
  aggregateMultiKrum,
} from '../aggregator/strategies/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';

/** Update with w = [x] and, when y is given, b = [y]. */
function point(vehicleId: string, x: number, y?: number): VehicleUpdate {
  const deltas = new Map([['w', Float32Array.from([x])]]);
  if (y !== undefined) deltas.set('b', Float32Array.from([y]));
  return { vehicleId, numExamples: 5, deltas };
}

function isFleetError(code: string) {
  return (err: unknown) => err instanceof FleetError && err.code === code;
}

/**
 * Five updates on a line: a = 0, b = 1, c = 2, d = 3, e = 100. With f = 1
 * each score sums the n - f - 2 = 2 smallest squared distances:
 *   a: 1 (b) + 4 (c) = 5       b: 1 (a) + 1 (c) = 2
 *   c: 1 (b) + 1 (d) = 2       d: 1 (c) + 4 (b) = 5
 *   e: 97^2 (d) + 98^2 (c) = 9409 + 9604 = 19013
 */
const LINE = [
  point('c', 2),
  point('e', 100),
  point('a', 0),
  point('d', 3),
  point('b', 1),
];

describe('aggregateKrum', () => {
  test('krum scores by hand', () => {
    const { scores } = aggregateKrum(LINE, { byzantineCount: 1 });

    assert.deepEqual(scores, [
      { vehicleId: 'b', score: 2 },
      { vehicleId: 'c', score: 2 },
      { vehicleId: 'a', score: 5 },
      { vehicleId: 'd', score: 5 },
      { vehicleId: 'e', score: 19013 },
    ]);
  });

  test('krum tie goes to smaller id', () => {
    // b and c both score 2, and b sorts first
    const result = aggregateKrum(LINE, { byzantineCount: 1 });

    assert.deepEqual(result.selectedVehicleIds, ['b']);
    assert.deepEqual([...result.deltas.get('w')!], [1]);
  });

  test('krum sums distances over tensors', () => {
    // points (w, b): a (0,0), b (1,0), c (0,1), d (2,2), e (10,10), f = 1
    //   a: 1 (b) + 1 (c) = 2       b: 1 (a) + 2 (c) = 3
    //   c: 1 (a) + 2 (b) = 3       d: 5 (b) + 5 (c) = 10
    //   e: 128 (d) + 181 (b) = 309
    const updates = [
      point('a', 0, 0),
      point('b', 1, 0),
      point('c', 0, 1),
      point('d', 2, 2),
      point('e', 10, 10),
    ];

    const result = aggregateKrum(updates, { byzantineCount: 1 });

    assert.deepEqual(
      result.scores.map((s) => s.score),
      [2, 3, 3, 10, 309],
    );
    assert.deepEqual(result.selectedVehicleIds, ['a']);
    assert.deepEqual([...result.deltas.get('w')!], [0]);
    assert.deepEqual([...result.deltas.get('b')!], [0]);
  });

  test('krum returns copied arrays', () => {
    const result = aggregateKrum(LINE, { byzantineCount: 1 });

    result.deltas.get('w')![0] = 42;

    assert.equal(LINE[4].deltas.get('w')![0], 1);
  });

  test('krum requires n > 2f + 2', () => {
    // f = 1 needs n > 4, and f = 0 needs n > 2
    assert.throws(
      () => aggregateKrum(LINE.slice(0, 4), { byzantineCount: 1 }),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    assert.throws(
      () => aggregateKrum(LINE.slice(0, 2), { byzantineCount: 0 }),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    assert.doesNotThrow(() =>
      aggregateKrum(LINE.slice(0, 3), { byzantineCount: 0 }),
    );
  });

  test('requirement message names n and f', () => {
    assert.throws(
      () => aggregateKrum(LINE.slice(0, 4), { byzantineCount: 1 }),
      (err: unknown) =>
        err instanceof FleetError &&
        /f = 1/.test(err.message) &&
        /n = 4/.test(err.message) &&
        /n > 2f \+ 2 = 4/.test(err.message),
    );
  });

  test('krum rejects NaN before scoring', () => {
    const updates = [...LINE.slice(0, 4), point('z', NaN)];

    assert.throws(
      () => aggregateKrum(updates, { byzantineCount: 1 }),
      isFleetError(ErrorCode.NonFiniteValue),
    );
  });

  test('krum same result any order', () => {
    const reversed = [...LINE].reverse();

    const first = aggregateKrum(LINE, { byzantineCount: 1 });
    const second = aggregateKrum(reversed, { byzantineCount: 1 });

    assert.deepEqual(second, first);
  });

  test('bad byzantineCount rejected', () => {
    for (const byzantineCount of [-1, 1.5, NaN]) {
      assert.throws(() => aggregateKrum(LINE, { byzantineCount }), RangeError);
    }
  });
});

describe('aggregateMultiKrum', () => {
  test('multi-krum averages best three', () => {
    // ranking b (2), c (2), a (5), d (5), e; a and d tie at the cut and
    // a sorts first: mean of 1, 2, 0 = 1
    const result = aggregateMultiKrum(LINE, {
      byzantineCount: 1,
      selectCount: 3,
    });

    assert.deepEqual(result.selectedVehicleIds, ['b', 'c', 'a']);
    assert.deepEqual([...result.deltas.get('w')!], [1]);
  });

  test('multi-krum leaves outlier out', () => {
    // m = 4 takes b, c, a, d: mean of 1, 2, 0, 3 = 1.5, without e = 100
    const result = aggregateMultiKrum(LINE, {
      byzantineCount: 1,
      selectCount: 4,
    });

    assert.deepEqual(result.selectedVehicleIds, ['b', 'c', 'a', 'd']);
    assert.deepEqual([...result.deltas.get('w')!], [1.5]);
  });

  test('multi-krum is unweighted', () => {
    const weighted = LINE.map((u) =>
      u.vehicleId === 'a' ? { ...u, numExamples: 1000 } : u,
    );

    const result = aggregateMultiKrum(weighted, {
      byzantineCount: 1,
      selectCount: 3,
    });

    assert.deepEqual([...result.deltas.get('w')!], [1]);
  });

  test('multi-krum with m = n averages all', () => {
    // (2 + 100 + 0 + 3 + 1) / 5 = 21.2
    const result = aggregateMultiKrum(LINE, {
      byzantineCount: 1,
      selectCount: 5,
    });

    assert.deepEqual([...result.deltas.get('w')!], [Math.fround(21.2)]);
  });

  test('selectCount checked against n', () => {
    assert.throws(
      () => aggregateMultiKrum(LINE, { byzantineCount: 1, selectCount: 6 }),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    for (const selectCount of [0, 1.5]) {
      assert.throws(
        () => aggregateMultiKrum(LINE, { byzantineCount: 1, selectCount }),
        RangeError,
      );
    }
  });
});
