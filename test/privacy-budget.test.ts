import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  computeRdp,
  convertRdpToEpsilon,
  DEFAULT_RDP_ORDERS,
  PrivacyBudget,
} from '../privacy/index.ts';

const DELTA = 1e-5;

describe('PrivacyBudget', () => {
  test('fresh budget has spent nothing', () => {
    const budget = new PrivacyBudget({ noiseMultiplier: 1 });

    assert.equal(budget.rounds, 0);
    assert.equal(budget.epsilon(DELTA), 0);
    assert.equal(budget.isExhausted(0.1, DELTA), false);
    assert.deepEqual(budget.orders, DEFAULT_RDP_ORDERS);
  });

  test('steps compose like computeRdp', () => {
    const budget = new PrivacyBudget({ noiseMultiplier: 1.1 });

    for (let round = 0; round < 40; round++) budget.step(0.25);

    const rdp = computeRdp(0.25, 1.1, 40);
    const expected = convertRdpToEpsilon(DEFAULT_RDP_ORDERS, rdp, DELTA);
    assert.equal(budget.rounds, 40);
    budget.rdp.forEach((value, i) => {
      assert.ok(Math.abs(value - rdp[i]) <= 1e-12 * rdp[i], `order ${i}`);
    });
    assert.ok(Math.abs(budget.epsilon(DELTA) - expected.epsilon) < 1e-9);
    assert.equal(budget.spent(DELTA).order, expected.order);
  });

  test('rates of different rounds add', () => {
    const budget = new PrivacyBudget({ noiseMultiplier: 1.3 });

    budget.step(3 / 12);
    budget.step(4 / 12);
    budget.step(0);

    const first = computeRdp(3 / 12, 1.3, 1);
    const second = computeRdp(4 / 12, 1.3, 1);
    budget.rdp.forEach((value, i) => {
      const sum = first[i] + second[i];
      assert.ok(Math.abs(value - sum) <= 1e-12 * sum, `order ${i}`);
    });
    assert.equal(budget.rounds, 3);
  });

  test('stops a 12-vehicle fleet at budget', () => {
    // 3 of 12 vehicles per round, z = 1, budget epsilon 4 at delta 1e-5.
    const budget = new PrivacyBudget({ noiseMultiplier: 1 });
    const target = 4;
    const epsilons: number[] = [];

    while (!budget.isExhausted(target, DELTA) && budget.rounds < 10_000) {
      budget.step(3 / 12);
      epsilons.push(budget.epsilon(DELTA));
    }

    assert.ok(budget.rounds > 1, `rounds ${budget.rounds}`);
    assert.ok(budget.rounds < 10_000, `rounds ${budget.rounds}`);
    assert.ok(epsilons[epsilons.length - 1] >= target);
    assert.ok(epsilons[epsilons.length - 2] < target);
    for (let i = 1; i < epsilons.length; i++) {
      assert.ok(epsilons[i] > epsilons[i - 1], `round ${i + 1}`);
    }
  });

  test('epsilonAfterStep previews without recording', () => {
    const budget = new PrivacyBudget({ noiseMultiplier: 0.9 });
    budget.step(0.1);

    const preview = budget.epsilonAfterStep(0.2, DELTA);

    assert.equal(budget.rounds, 1);
    budget.step(0.2);
    assert.equal(budget.epsilon(DELTA), preview);
  });

  test('json round trip resumes exactly', () => {
    const options = { noiseMultiplier: 1.2, conversion: 'standard' as const };
    const uninterrupted = new PrivacyBudget(options);
    const beforeRestart = new PrivacyBudget(options);
    for (let round = 0; round < 25; round++) {
      uninterrupted.step(0.3);
      beforeRestart.step(0.3);
    }

    const saved = JSON.stringify(beforeRestart);
    const restored = PrivacyBudget.fromJSON(JSON.parse(saved));
    for (let round = 0; round < 5; round++) {
      uninterrupted.step(0.3);
      restored.step(0.3);
    }

    assert.equal(restored.rounds, 30);
    assert.equal(restored.conversion, 'standard');
    assert.equal(restored.noiseMultiplier, 1.2);
    assert.deepEqual(restored.rdp, uninterrupted.rdp);
    assert.equal(restored.epsilon(DELTA), uninterrupted.epsilon(DELTA));
  });

  test('state keeps infinite rdp as null', () => {
    const state = new PrivacyBudget({
      noiseMultiplier: 1,
      orders: [2, 3],
    }).toJSON();
    state.rdp = [null, 0.5];

    const restored = PrivacyBudget.fromJSON(JSON.parse(JSON.stringify(state)));

    assert.deepEqual(restored.rdp, [Infinity, 0.5]);
    assert.deepEqual(restored.toJSON().rdp, [null, 0.5]);
  });

  test('rejects malformed saved state', () => {
    const valid = new PrivacyBudget({
      noiseMultiplier: 1,
      orders: [2, 3],
    }).toJSON();
    const wrongShape = [
      null,
      [],
      { ...valid, version: 2 },
      { ...valid, rdp: [0.1] },
      { ...valid, orders: ['2', '3'] },
      { ...valid, conversion: 'loose' },
    ];
    for (const state of wrongShape) {
      assert.throws(() => PrivacyBudget.fromJSON(state), TypeError);
    }

    const outOfRange = [
      { ...valid, rdp: [-1, 0] },
      { ...valid, rounds: -1 },
      { ...valid, noiseMultiplier: 0 },
      { ...valid, orders: [1, 3] },
    ];
    for (const state of outOfRange) {
      assert.throws(() => PrivacyBudget.fromJSON(state), RangeError);
    }
  });

  test('rejects invalid arguments', () => {
    assert.throws(() => new PrivacyBudget({ noiseMultiplier: 0 }), RangeError);
    assert.throws(
      () => new PrivacyBudget({ noiseMultiplier: 1, orders: [0.5] }),
      RangeError,
    );
    const budget = new PrivacyBudget({ noiseMultiplier: 1 });
    assert.throws(() => budget.step(1.2), RangeError);
    assert.throws(() => budget.step(0.1, 0), RangeError);
    assert.throws(() => budget.epsilon(0), RangeError);
    assert.throws(() => budget.isExhausted(0, DELTA), RangeError);
    assert.equal(budget.rounds, 0);
  });
});
