import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ATTACK_MAX_ABS, applyAttack } from '../vehicle-agent/index.ts';
import {
  flipLabels,
  selectAttackers,
  vehicleAttack,
} from '../scripts/sim/attackers.ts';
import type { LabelledImages } from '../models/index.ts';

const deltas = new Map([
  ['a', Float32Array.from([0.5, -1, 2])],
  ['b', Float32Array.from([0.25])],
]);

describe('update attacks', () => {
  test('boost multiplies by scale', () => {
    const out = applyAttack(deltas, { kind: 'boost', scale: 10 }, 1);
    assert.deepEqual([...out.get('a')!], [5, -10, 20]);
    assert.deepEqual([...out.get('b')!], [2.5]);
  });

  test('sign flip negates and scales', () => {
    const out = applyAttack(deltas, { kind: 'sign-flip', scale: 2 }, 1);
    assert.deepEqual([...out.get('a')!], [-1, 2, -4]);
  });

  test('attacked values stay accepted', () => {
    const out = applyAttack(deltas, { kind: 'boost', scale: 1e6 }, 1);
    assert.equal(out.get('a')![2], ATTACK_MAX_ABS);
    assert.equal(out.get('a')![1], -ATTACK_MAX_ABS);
  });

  test('noise is seeded and scaled', () => {
    const big = new Map([['w', new Float32Array(20_000).fill(0.01)]]);
    const first = applyAttack(big, { kind: 'noise', scale: 3 }, 5);
    const again = applyAttack(big, { kind: 'noise', scale: 3 }, 5);
    assert.deepEqual(first.get('w'), again.get('w'));
    const values = first.get('w')!;
    const rms = Math.sqrt(
      values.reduce((sum, value) => sum + value * value, 0) / values.length,
    );
    // Expected std: 3 x RMS of the honest update (0.01).
    assert.ok(Math.abs(rms - 0.03) < 0.001, `rms ${rms}`);
  });

  test('unknown attack kind rejected', () => {
    assert.throws(
      () => applyAttack(deltas, { kind: 'melt' as never, scale: 1 }, 1),
      RangeError,
    );
    assert.throws(
      () => applyAttack(deltas, { kind: 'boost', scale: 0 }, 1),
      RangeError,
    );
  });
});

describe('simulated attackers', () => {
  const frames: LabelledImages = {
    images: new Float32Array(2 * 32 * 32 * 3),
    labels: Int32Array.from([0, 40]),
    count: 2,
    paths: ['x', 'y'],
    tracks: ['', ''],
  };

  test('first ids by sort attack', () => {
    const ids = ['veh-003', 'veh-001', 'veh-002'];
    assert.deepEqual(selectAttackers(ids, 2), ['veh-001', 'veh-002']);
    assert.deepEqual(selectAttackers(ids, 0), []);
    assert.throws(() => selectAttackers(ids, 4), RangeError);
  });

  test('label flip mirrors class ids', () => {
    assert.deepEqual([...flipLabels(frames).labels], [42, 2]);
    assert.deepEqual([...frames.labels], [0, 40]);
    const settings = {
      attackers: 1,
      attack: 'label-flip' as const,
      attackScale: 10,
    };
    const flipped = vehicleAttack(settings, true, frames);
    assert.equal(flipped.attack, undefined);
    assert.deepEqual([...flipped.frames.labels], [42, 2]);
    assert.equal(vehicleAttack(settings, false, frames).frames, frames);
  });

  test('boost attacker gets update attack', () => {
    const settings = { attackers: 1, attack: 'boost' as const, attackScale: 7 };
    const result = vehicleAttack(settings, true, frames);
    assert.deepEqual(result.attack, { kind: 'boost', scale: 7 });
    assert.equal(result.frames, frames);
  });
});
