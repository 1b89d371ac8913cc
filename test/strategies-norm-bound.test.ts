import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  type NormDecision,
  type VehicleUpdate,
  applyNormBound,
  clipToNorm,
  computeUpdateNorm,
} from '../aggregator/strategies/index.ts';
import { createRandom } from '../models/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';

function tensors(values: Record<string, number[]>): Map<string, Float32Array> {
  return new Map(
    Object.entries(values).map(([name, v]) => [name, Float32Array.from(v)]),
  );
}

function update(vehicleId: string, w: number[]): VehicleUpdate {
  return { vehicleId, numExamples: 3, deltas: tensors({ w }) };
}

function isFleetError(code: string) {
  return (err: unknown) => err instanceof FleetError && err.code === code;
}

function outcomes(decisions: NormDecision[]): string[] {
  return decisions.map((d) => `${d.vehicleId}:${d.outcome}`);
}

/** Norms 1, 2, 3 and 100; median (2 + 3) / 2 = 2.5. */
const ROUND = [
  update('d', [60, 80]),
  update('a', [1, 0]),
  update('c', [0, 3]),
  update('b', [0, 2]),
];

describe('computeUpdateNorm', () => {
  test('norm spans all tensors', () => {
    // sqrt(3^2 + 4^2) = 5; sqrt(1 + 4 + 4) = 3
    assert.equal(computeUpdateNorm(tensors({ w: [3], b: [4] })), 5);
    assert.equal(computeUpdateNorm(tensors({ w: [1, 2, 2] })), 3);
    assert.equal(computeUpdateNorm(new Map()), 0);
  });

  test('norm rejects NaN', () => {
    assert.throws(
      () => computeUpdateNorm(tensors({ w: [1], b: [NaN] })),
      isFleetError(ErrorCode.NonFiniteValue),
    );
  });
});

describe('clipToNorm', () => {
  test('clip within bound keeps arrays', () => {
    const deltas = tensors({ w: [3], b: [4] });

    const result = clipToNorm(deltas, 5);

    assert.equal(result.isClipped, false);
    assert.equal(result.scale, 1);
    assert.equal(result.norm, 5);
    assert.equal(result.deltas.get('w'), deltas.get('w'));
  });

  test('clip scales down to bound', () => {
    const deltas = tensors({ w: [3], b: [4] });

    const result = clipToNorm(deltas, 2.5);

    // scale 2.5 / 5 = 0.5: [1.5], [2]
    assert.equal(result.isClipped, true);
    assert.equal(result.scale, 0.5);
    assert.deepEqual([...result.deltas.get('w')!], [1.5]);
    assert.deepEqual([...result.deltas.get('b')!], [2]);
    assert.deepEqual([...deltas.get('w')!], [3]);
  });

  test('clipped norm never above bound', () => {
    const random = createRandom(20240611);
    for (let trial = 0; trial < 200; trial++) {
      const values = Array.from({ length: 17 }, () => random() * 6 - 3);
      const deltas = tensors({ w: values.slice(0, 12), b: values.slice(12) });
      const maxNorm = random() * 2 + 1e-3;

      const result = clipToNorm(deltas, maxNorm);

      assert.ok(
        computeUpdateNorm(result.deltas) <= maxNorm,
        `trial ${trial}: norm above ${maxNorm}`,
      );
    }
  });

  test('clip to zero gives zeros', () => {
    const result = clipToNorm(tensors({ w: [1, -2] }), 0);

    assert.equal(computeUpdateNorm(result.deltas), 0);
  });

  test('bad maxNorm rejected', () => {
    for (const maxNorm of [-1, NaN, Infinity]) {
      assert.throws(() => clipToNorm(tensors({ w: [1] }), maxNorm), RangeError);
    }
  });
});

describe('applyNormBound', () => {
  test('reject above median multiple', () => {
    const result = applyNormBound(ROUND, { action: 'reject', medianFactor: 2 });

    // bound 2 x 2.5 = 5; d has norm sqrt(60^2 + 80^2) = 100
    assert.equal(result.medianNorm, 2.5);
    assert.equal(result.bound, 5);
    assert.deepEqual(outcomes(result.decisions), [
      'a:accepted',
      'b:accepted',
      'c:accepted',
      'd:rejected',
    ]);
    const rejected = result.decisions[3];
    assert.ok(rejected.outcome === 'rejected');
    assert.equal(rejected.reasonCode, ErrorCode.UpdateNormTooLarge);
    assert.equal(rejected.norm, 100);
    assert.match(rejected.reason, /norm 100/);
  });

  test('clip above median multiple', () => {
    const result = applyNormBound(ROUND, { action: 'clip', medianFactor: 2 });

    // d scaled by 5 / 100: [60, 80] becomes [3, 4]
    const clipped = result.decisions[3];
    assert.ok(clipped.outcome === 'clipped');
    assert.equal(clipped.scale, 0.05);
    assert.deepEqual([...clipped.deltas.get('w')!], [3, 4]);
    assert.equal(result.decisions[0].outcome, 'accepted');
  });

  test('absolute bound alone', () => {
    const result = applyNormBound(ROUND, { action: 'reject', maxNorm: 2 });

    // norm 2 equals the bound and is accepted; 3 and 100 are above it
    assert.equal(result.bound, 2);
    assert.equal(result.medianNorm, 2.5);
    assert.deepEqual(outcomes(result.decisions), [
      'a:accepted',
      'b:accepted',
      'c:rejected',
      'd:rejected',
    ]);
  });

  test('smaller of both bounds applies', () => {
    const loose = applyNormBound(ROUND, {
      action: 'reject',
      medianFactor: 2,
      maxNorm: 50,
    });
    const tight = applyNormBound(ROUND, {
      action: 'reject',
      medianFactor: 2,
      maxNorm: 2.5,
    });

    // min(5, 50) = 5 and min(5, 2.5) = 2.5
    assert.equal(loose.bound, 5);
    assert.equal(tight.bound, 2.5);
    assert.deepEqual(outcomes(tight.decisions), [
      'a:accepted',
      'b:accepted',
      'c:rejected',
      'd:rejected',
    ]);
  });

  test('median of odd count', () => {
    // norms 1, 2, 100: median 2, bound 1.5 x 2 = 3
    const result = applyNormBound(
      [update('a', [1]), update('b', [2]), update('c', [100])],
      { action: 'reject', medianFactor: 1.5 },
    );

    assert.equal(result.medianNorm, 2);
    assert.equal(result.bound, 3);
    assert.deepEqual(outcomes(result.decisions), [
      'a:accepted',
      'b:accepted',
      'c:rejected',
    ]);
  });

  test('non-finite update rejected alone', () => {
    const updates = [update('a', [1]), update('b', [NaN]), update('c', [2])];

    const result = applyNormBound(updates, {
      action: 'clip',
      medianFactor: 1,
    });

    // the median is over a and c only: (1 + 2) / 2 = 1.5
    assert.equal(result.medianNorm, 1.5);
    const nonFinite = result.decisions[1];
    assert.ok(nonFinite.outcome === 'rejected');
    assert.equal(nonFinite.reasonCode, ErrorCode.NonFiniteValue);
    assert.equal(nonFinite.norm, undefined);
    assert.equal(result.decisions[2].outcome, 'clipped');
  });

  test('all non-finite leaves no bound', () => {
    const result = applyNormBound([update('a', [Infinity])], {
      action: 'reject',
      medianFactor: 3,
    });

    assert.equal(result.medianNorm, undefined);
    assert.equal(result.bound, undefined);
    assert.deepEqual(outcomes(result.decisions), ['a:rejected']);
  });

  test('median bound requires n >= 1', () => {
    assert.throws(
      () => applyNormBound([], { action: 'reject', medianFactor: 2 }),
      isFleetError(ErrorCode.RobustRuleUnsatisfied),
    );
    assert.deepEqual(
      applyNormBound([], { action: 'reject', maxNorm: 1 }).decisions,
      [],
    );
  });

  test('decisions same in any order', () => {
    const reversed = [...ROUND].reverse();

    const first = applyNormBound(ROUND, { action: 'clip', medianFactor: 2 });
    const second = applyNormBound(reversed, {
      action: 'clip',
      medianFactor: 2,
    });

    assert.deepEqual(second, first);
  });

  test('duplicate vehicle rejected', () => {
    assert.throws(
      () =>
        applyNormBound([update('a', [1]), update('a', [2])], {
          action: 'reject',
          maxNorm: 5,
        }),
      isFleetError(ErrorCode.DuplicateUpdate),
    );
  });

  test('bad bound options rejected', () => {
    const bad = [
      { action: 'reject' as const },
      { action: 'reject' as const, medianFactor: 0 },
      { action: 'reject' as const, medianFactor: Infinity },
      { action: 'clip' as const, maxNorm: -1 },
      { action: 'drop' as 'clip', maxNorm: 1 },
    ];

    for (const options of bad) {
      assert.throws(
        () => applyNormBound(ROUND, options),
        RangeError,
        JSON.stringify(options),
      );
    }
  });
});
