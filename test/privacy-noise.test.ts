import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  addGaussianNoise,
  computeMeanNoiseStdDev,
  computeNoisyMean,
  createGaussianSource,
} from '../privacy/index.ts';
import type { NormalSource } from '../privacy/index.ts';

const DRAWS = 100_000;

interface Moments {
  mean: number;
  std: number;
  withinOneStd: number;
}

function measure(values: ArrayLike<number>, center = 0): Moments {
  let sum = 0;
  for (let i = 0; i < values.length; i++) sum += values[i];
  const mean = sum / values.length;
  let squares = 0;
  for (let i = 0; i < values.length; i++) {
    squares += (values[i] - mean) ** 2;
  }
  const std = Math.sqrt(squares / (values.length - 1));
  let inside = 0;
  for (let i = 0; i < values.length; i++) {
    if (Math.abs(values[i] - center) <= std) inside += 1;
  }
  return { mean, std, withinOneStd: inside / values.length };
}

/**
 * Checks samples against N(center, stdDev^2) to five standard errors:
 * stdDev / sqrt(n) for the mean, stdDev / sqrt(2n) for the standard
 * deviation, sqrt(p (1 - p) / n) for the share within one standard
 * deviation, p = 0.6827.
 */
function assertGaussian(values: ArrayLike<number>, stdDev: number, center = 0) {
  const n = values.length;
  const { mean, std, withinOneStd } = measure(values, center);
  assert.ok(
    Math.abs(mean - center) < (5 * stdDev) / Math.sqrt(n),
    `mean ${mean}, expected ${center}`,
  );
  assert.ok(
    Math.abs(std - stdDev) < (5 * stdDev) / Math.sqrt(2 * n),
    `std ${std}, expected ${stdDev}`,
  );
  assert.ok(
    Math.abs(withinOneStd - 0.6827) < 5 * Math.sqrt((0.6827 * 0.3173) / n),
    `share within one std ${withinOneStd}, expected 0.6827`,
  );
}

function draw(normal: NormalSource, count: number): Float64Array {
  const values = new Float64Array(count);
  for (let i = 0; i < count; i++) values[i] = normal();
  return values;
}

describe('createGaussianSource', () => {
  test('seeded source is standard normal', () => {
    const values = draw(
      createGaussianSource({ kind: 'seeded', seed: 42 }),
      DRAWS,
    );

    assertGaussian(values, 1);
  });

  test('crypto source is standard normal', () => {
    const values = draw(createGaussianSource({ kind: 'crypto' }), DRAWS);

    assertGaussian(values, 1);
  });

  test('equal seeds give equal noise', () => {
    const first = draw(createGaussianSource({ kind: 'seeded', seed: 3 }), 64);
    const second = draw(createGaussianSource({ kind: 'seeded', seed: 3 }), 64);
    const other = draw(createGaussianSource({ kind: 'seeded', seed: 4 }), 64);

    assert.deepEqual(first, second);
    assert.notDeepEqual(first, other);
  });

  test('rejects an unsafe seed', () => {
    assert.throws(
      () => createGaussianSource({ kind: 'seeded', seed: 0.5 }),
      RangeError,
    );
  });
});

describe('addGaussianNoise', () => {
  test('noise has requested std', () => {
    const zeros = new Map([['w', new Float32Array(DRAWS)]]);
    const normal = createGaussianSource({ kind: 'seeded', seed: 11 });

    const noisy = addGaussianNoise(zeros, 0.3, normal);

    assertGaussian(noisy.get('w')!, 0.3);
    assert.ok(zeros.get('w')!.every((value) => value === 0));
  });

  test('zero std copies values', () => {
    const input = new Map([['w', Float32Array.from([1.5, -2])]]);
    const normal = createGaussianSource({ kind: 'seeded', seed: 1 });

    const noisy = addGaussianNoise(input, 0, normal);

    assert.deepEqual([...noisy.get('w')!], [1.5, -2]);
    assert.notEqual(noisy.get('w'), input.get('w'));
  });

  test('rejects a negative std', () => {
    const normal = createGaussianSource({ kind: 'seeded', seed: 1 });
    assert.throws(() => addGaussianNoise(new Map(), -1, normal), RangeError);
  });
});

describe('DP-FedAvg noisy mean', () => {
  test('mean noise std is zC/m', () => {
    // z = 1.1, C = 2, m = 8: 1.1 * 2 / 8 = 0.275
    const options = { noiseMultiplier: 1.1, clipNorm: 2, expectedVehicles: 8 };

    assert.ok(Math.abs(computeMeanNoiseStdDev(options) - 0.275) < 1e-15);
  });

  test('noisy mean divides by m', () => {
    // Sum 4 everywhere, m = 8: mean 0.5 with noise std 1.1 * 2 / 8.
    const sum = new Map([['w', new Float32Array(DRAWS).fill(4)]]);
    const options = { noiseMultiplier: 1.1, clipNorm: 2, expectedVehicles: 8 };
    const normal = createGaussianSource({ kind: 'seeded', seed: 5 });

    const mean = computeNoisyMean(sum, options, normal);

    assertGaussian(mean.get('w')!, 0.275, 0.5);
  });

  test('zero multiplier gives exact mean', () => {
    const sum = new Map([['w', Float32Array.from([3, -6])]]);
    const options = { noiseMultiplier: 0, clipNorm: 1, expectedVehicles: 3 };
    const normal = createGaussianSource({ kind: 'seeded', seed: 5 });

    const mean = computeNoisyMean(sum, options, normal);

    assert.deepEqual([...mean.get('w')!], [1, -2]);
  });

  test('rejects invalid noise options', () => {
    const normal = createGaussianSource({ kind: 'seeded', seed: 5 });
    const valid = { noiseMultiplier: 1, clipNorm: 1, expectedVehicles: 4 };
    const invalid = [
      { ...valid, noiseMultiplier: -0.1 },
      { ...valid, clipNorm: 0 },
      { ...valid, expectedVehicles: 0 },
      { ...valid, expectedVehicles: NaN },
    ];
    for (const options of invalid) {
      assert.throws(() => computeMeanNoiseStdDev(options), RangeError);
      assert.throws(
        () => computeNoisyMean(new Map(), options, normal),
        RangeError,
      );
    }
  });
});
