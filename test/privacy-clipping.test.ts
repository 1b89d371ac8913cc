import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { clipUpdate, computeUpdateNorm } from '../privacy/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { createRandom } from '../models/index.ts';

function update(entries: Record<string, number[]>): Map<string, Float32Array> {
  return new Map(
    Object.entries(entries).map(([name, values]) => [
      name,
      Float32Array.from(values),
    ]),
  );
}

describe('computeUpdateNorm', () => {
  test('norm spans all tensors', () => {
    // sqrt(3^2 + 0^2 + 4^2) = 5
    assert.equal(computeUpdateNorm(update({ a: [3, 0], b: [4] })), 5);
  });

  test('empty update has norm zero', () => {
    assert.equal(computeUpdateNorm(new Map()), 0);
  });
});

describe('clipUpdate', () => {
  test('halves an update of norm two', () => {
    const input = update({ w: [1, 1, 1, 1] });

    const result = clipUpdate(input, 1);

    // norm sqrt(4) = 2 and scale 1 / 2. 0.5 is exact in float32.
    assert.equal(result.norm, 2);
    assert.equal(result.scale, 0.5);
    assert.deepEqual([...result.clipped.get('w')!], [0.5, 0.5, 0.5, 0.5]);
    assert.deepEqual([...input.get('w')!], [1, 1, 1, 1]);
  });

  test('scales a 3-4-5 update to 0.6 and 0.8', () => {
    const result = clipUpdate(update({ a: [3, 0], b: [-4] }), 1);

    // norm 5, scale 1 / 5: 3 / 5 = 0.6, -4 / 5 = -0.8, each within one
    // float32 ulp (2^-24 near 0.6, 2^-24 near 0.8).
    assert.equal(result.norm, 5);
    const [a0, a1] = result.clipped.get('a')!;
    const [b0] = result.clipped.get('b')!;
    assert.ok(Math.abs(a0 - 0.6) <= 2 ** -24, `a[0] = ${a0}`);
    assert.equal(a1, 0);
    assert.ok(Math.abs(b0 + 0.8) <= 2 ** -24, `b[0] = ${b0}`);
    assert.ok(computeUpdateNorm(result.clipped) <= 1);
  });

  test('copies an update within bound', () => {
    const input = update({ w: [0.3, -0.4] });

    const result = clipUpdate(input, 1);

    assert.equal(result.scale, 1);
    assert.ok(Math.abs(result.norm - 0.5) < 1e-7);
    assert.notEqual(result.clipped.get('w'), input.get('w'));
    assert.deepEqual([...result.clipped.get('w')!], [...input.get('w')!]);
  });

  test('clipped norm never exceeds bound', () => {
    const random = createRandom(7);
    for (let trial = 0; trial < 200; trial++) {
      const values = Array.from({ length: 1 + trial }, () => random() - 0.5);
      const clipNorm = 0.01 + random() * 0.2;

      const result = clipUpdate(update({ w: values }), clipNorm);

      const clippedNorm = computeUpdateNorm(result.clipped);
      assert.ok(clippedNorm <= clipNorm, `trial ${trial}: ${clippedNorm}`);
      if (result.norm > clipNorm) {
        assert.ok(clippedNorm > clipNorm * (1 - 1e-6), `trial ${trial}`);
      }
    }
  });

  test('rejects non-finite update values', () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      assert.throws(
        () => clipUpdate(update({ w: [1, bad] }), 1),
        (err: unknown) =>
          err instanceof FleetError && err.code === ErrorCode.NonFiniteValue,
      );
    }
  });

  test('rejects invalid clip norms', () => {
    for (const clipNorm of [0, -1, NaN, Infinity]) {
      assert.throws(() => clipUpdate(update({ w: [1] }), clipNorm), RangeError);
    }
  });
});
