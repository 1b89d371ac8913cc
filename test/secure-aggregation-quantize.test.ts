import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { createRandom } from '../models/index.ts';
import {
  createQuantization,
  dequantizeSum,
  quantize,
} from '../secure-aggregation/index.ts';

const SEED = 20250501;

function randomVector(length: number, bound: number, seed: number) {
  const random = createRandom(seed);
  return Float32Array.from({ length }, () => (2 * random() - 1) * bound);
}

describe('createQuantization', () => {
  test('scale leaves room for n summands', () => {
    const quantization = createQuantization(0.5, 10);

    // floor((2^31 - 1) / 10) = 214748364
    assert.equal(quantization.maxMagnitude, 214748364);
    assert.equal(quantization.scale, 214748364 / 0.5);
    assert.ok(10 * quantization.maxMagnitude <= 2 ** 31 - 1);
    assert.equal(quantization.step, 1 / quantization.scale);
  });

  test('rejects invalid bound and count', () => {
    for (const bound of [0, -1, NaN, Infinity, 1e39]) {
      assert.throws(() => createQuantization(bound, 10), RangeError);
    }
    for (const count of [0, 1.5, -3, 2 ** 31]) {
      assert.throws(() => createQuantization(1, count), RangeError);
    }
  });
});

describe('quantize', () => {
  test('deterministic round trip within half step', () => {
    const quantization = createQuantization(1, 10);
    const values = randomVector(10_000, 1, SEED);

    const decoded = dequantizeSum(
      quantize(values, quantization),
      quantization,
      1,
    );

    let maxError = 0;
    for (let i = 0; i < values.length; i++) {
      maxError = Math.max(maxError, Math.abs(decoded[i] - values[i]));
    }
    assert.ok(
      maxError <= quantization.step / 2,
      `max error ${maxError} above half step ${quantization.step / 2}`,
    );
  });

  test('stochastic round trip within one step', () => {
    const quantization = createQuantization(0.25, 4);
    const values = randomVector(10_000, 0.25, SEED + 1);

    const words = quantize(values, quantization, 'stochastic');
    const decoded = dequantizeSum(words, quantization, 1);

    let maxError = 0;
    for (let i = 0; i < values.length; i++) {
      maxError = Math.max(maxError, Math.abs(decoded[i] - values[i]));
    }
    assert.ok(
      maxError < quantization.step,
      `max error ${maxError} not below step ${quantization.step}`,
    );
  });

  test('stochastic rounding is unbiased', () => {
    const quantization = createQuantization(1, 10);
    // A quarter step: rounds to 1 with probability 0.25, else to 0.
    const quarterStep = Math.fround(0.25 * quantization.step);
    const values = new Float32Array(20_000).fill(quarterStep);

    const words = quantize(values, quantization, 'stochastic');
    const exact = quarterStep * quantization.scale;
    let ones = 0;
    for (const word of words) ones += word;
    const mean = ones / words.length;

    // Binomial mean with sd sqrt(p(1-p)/n) = 0.0031; allow 6 sd.
    assert.ok(words.every((word) => word === 0 || word === 1));
    assert.ok(Math.abs(mean - exact) < 0.019, `mean ${mean}, exact ${exact}`);
  });

  test('negative values wrap modulo 2^32', () => {
    const quantization = createQuantization(1, 2);

    const words = quantize(Float32Array.from([-1, 1, 0]), quantization);

    assert.equal(words[0], 2 ** 32 - quantization.maxMagnitude);
    assert.equal(words[1], quantization.maxMagnitude);
    assert.equal(words[2], 0);
  });

  test('accepts float32 rounding of bound', () => {
    const quantization = createQuantization(0.1, 10);
    // Math.fround(0.1) = 0.10000000149..., above the bound as a double.
    const values = Float32Array.from([0.1, -0.1]);

    const words = quantize(values, quantization, 'stochastic');

    assert.equal(words[0], quantization.maxMagnitude);
    assert.equal(words[1], 2 ** 32 - quantization.maxMagnitude);
  });

  test('rejects values outside bound', () => {
    const quantization = createQuantization(1, 10);

    for (const bad of [1.001, -2, NaN, Infinity]) {
      const values = Float32Array.from([0, bad]);
      assert.throws(() => quantize(values, quantization), RangeError);
    }
  });
});

describe('dequantizeSum', () => {
  test('extreme sums decode without wrap', () => {
    const vehicles = 7;
    const quantization = createQuantization(2, vehicles);
    const high = quantize(Float32Array.from([2, -2]), quantization);

    const sum = new Uint32Array(2);
    for (let v = 0; v < vehicles; v++) {
      sum[0] += high[0];
      sum[1] += high[1];
    }
    const decoded = dequantizeSum(sum, quantization, vehicles);

    assert.ok(Math.abs(decoded[0] - 14) <= vehicles * quantization.step);
    assert.ok(Math.abs(decoded[1] + 14) <= vehicles * quantization.step);
  });

  test('sum of ten within quantization step', () => {
    const vehicles = 10;
    const quantization = createQuantization(0.5, vehicles);
    const updates = Array.from({ length: vehicles }, (_, v) =>
      randomVector(5_000, 0.5, SEED + 10 + v),
    );

    const sumWords = new Uint32Array(5_000);
    for (const update of updates) {
      const words = quantize(update, quantization);
      for (let i = 0; i < words.length; i++) sumWords[i] += words[i];
    }
    const decoded = dequantizeSum(sumWords, quantization, vehicles);

    for (let i = 0; i < decoded.length; i++) {
      let plain = 0;
      for (const update of updates) plain += update[i];
      // Each vehicle's rounding error is at most step / 2, so the mean
      // (FedAvg with equal weights) is within half a step.
      const meanError = Math.abs(decoded[i] - plain) / vehicles;
      assert.ok(meanError <= quantization.step / 2, `element ${i}`);
    }
  });

  test('rejects count above maxVehicles', () => {
    const quantization = createQuantization(1, 3);

    assert.throws(
      () => dequantizeSum(new Uint32Array(2), quantization, 4),
      RangeError,
    );
    assert.throws(
      () => dequantizeSum(new Uint32Array(2), quantization, 0),
      RangeError,
    );
  });
});
