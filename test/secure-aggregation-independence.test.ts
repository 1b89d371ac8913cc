import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { createRandom } from '../models/index.ts';
import {
  createQuantization,
  quantize,
  runSecureRound,
} from '../secure-aggregation/index.ts';

// The checks below are statistical. Every round draws fresh X25519 keys
// and self-mask secrets, so the data differ per run. Each threshold is set
// so that a correct implementation fails it with probability about 1e-6.

const CLIP_BOUND = 1;
const VEHICLES = ['veh-a', 'veh-b', 'veh-c'];
const TARGET = 'veh-a';
const WORDS_PER_ROUND = 1_024;
/** 16 rounds of 1,024 words: 64 KiB of masked input per update. */
const ROUNDS = 16;
/**
 * Upper 1e-6 quantile of the chi-square distribution with 255 degrees of
 * freedom (256 byte values), from scipy.stats.chi2.ppf(1 - 1e-6, 255).
 */
const CHI_SQUARE_CRITICAL = 377.08;

function randomUpdate(length: number, seed: number): Float32Array {
  const random = createRandom(seed);
  return Float32Array.from({ length }, () => (2 * random() - 1) * CLIP_BOUND);
}

/** Runs a round and returns the words the server got from TARGET. */
function maskedInputOf(update: Float32Array, round: number): Uint32Array {
  const result = runSecureRound({
    vehicles: VEHICLES,
    updates: [
      update,
      randomUpdate(update.length, 1_000 + 2 * round),
      randomUpdate(update.length, 1_001 + 2 * round),
    ],
    threshold: 2,
    clipBound: CLIP_BOUND,
    roundId: `independence-${round}`,
  });
  const input = result.serverView.maskedInputs.find(
    (item) => item.vehicleId === TARGET,
  );
  return input!.maskedWords;
}

function byteHistogram(chunks: readonly Uint32Array[]): Float64Array {
  const counts = new Float64Array(256);
  for (const words of chunks) {
    const bytes = new Uint8Array(
      words.buffer,
      words.byteOffset,
      words.byteLength,
    );
    for (const byte of bytes) counts[byte]++;
  }
  return counts;
}

function chiSquareUniform(counts: Float64Array): number {
  const total = counts.reduce((a, b) => a + b, 0);
  const expected = total / counts.length;
  return counts.reduce((sum, c) => sum + (c - expected) ** 2 / expected, 0);
}

/** Two-sample homogeneity statistic for histograms of equal totals. */
function chiSquareHomogeneity(a: Float64Array, b: Float64Array): number {
  let statistic = 0;
  for (let i = 0; i < a.length; i++) {
    if (a[i] + b[i] > 0) statistic += (a[i] - b[i]) ** 2 / (a[i] + b[i]);
  }
  return statistic;
}

function pearson(x: ArrayLike<number>, y: ArrayLike<number>): number {
  const n = x.length;
  let meanX = 0;
  let meanY = 0;
  for (let i = 0; i < n; i++) {
    meanX += x[i] / n;
    meanY += y[i] / n;
  }
  let covariance = 0;
  let varianceX = 0;
  let varianceY = 0;
  for (let i = 0; i < n; i++) {
    covariance += (x[i] - meanX) * (y[i] - meanY);
    varianceX += (x[i] - meanX) ** 2;
    varianceY += (y[i] - meanY) ** 2;
  }
  return covariance / Math.sqrt(varianceX * varianceY);
}

describe('masked input independence', () => {
  const zeros = new Float32Array(WORDS_PER_ROUND);
  const large = new Float32Array(WORDS_PER_ROUND).fill(CLIP_BOUND);
  const zeroChunks: Uint32Array[] = [];
  const largeChunks: Uint32Array[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    zeroChunks.push(maskedInputOf(zeros, round));
    largeChunks.push(maskedInputOf(large, ROUNDS + round));
  }
  const zeroCounts = byteHistogram(zeroChunks);
  const largeCounts = byteHistogram(largeChunks);

  test('masked bytes look uniform', (t) => {
    const zeroStatistic = chiSquareUniform(zeroCounts);
    const largeStatistic = chiSquareUniform(largeCounts);

    t.diagnostic(`chi-square zero ${zeroStatistic.toFixed(1)}`);
    t.diagnostic(`chi-square large ${largeStatistic.toFixed(1)}`);
    assert.equal(
      zeroCounts.reduce((a, b) => a + b, 0),
      65_536,
    );
    assert.ok(
      zeroStatistic < CHI_SQUARE_CRITICAL,
      `zero update: chi-square ${zeroStatistic.toFixed(1)}`,
    );
    assert.ok(
      largeStatistic < CHI_SQUARE_CRITICAL,
      `large update: chi-square ${largeStatistic.toFixed(1)}`,
    );
  });

  test('zero and large updates indistinguishable', (t) => {
    const statistic = chiSquareHomogeneity(zeroCounts, largeCounts);

    t.diagnostic(`homogeneity chi-square ${statistic.toFixed(1)}`);
    assert.ok(
      statistic < CHI_SQUARE_CRITICAL,
      `homogeneity chi-square ${statistic.toFixed(1)}`,
    );
  });

  test('unmasked update fails the check', (t) => {
    // Control: the same statistic detects the quantized update without
    // masks, so the checks above have power.
    const quantization = createQuantization(CLIP_BOUND, VEHICLES.length);
    const words = quantize(randomUpdate(16 * WORDS_PER_ROUND, 5), quantization);

    const statistic = chiSquareUniform(byteHistogram([words]));

    t.diagnostic(`chi-square unmasked ${statistic.toFixed(0)}`);
    assert.ok(statistic > 10 * CHI_SQUARE_CRITICAL, `chi-square ${statistic}`);
  });

  test('masked words uncorrelated with update', (t) => {
    const length = 16 * WORDS_PER_ROUND;
    const update = randomUpdate(length, 6);
    const quantization = createQuantization(CLIP_BOUND, VEHICLES.length);

    const masked = maskedInputOf(update, 2 * ROUNDS);
    const signed = new Int32Array(masked.buffer, masked.byteOffset, length);
    const plain = new Int32Array(quantize(update, quantization).buffer);

    // Under independence r is about normal with sd 1 / sqrt(16384) =
    // 0.0078; 5 sd is 0.039 (two-sided p about 6e-7).
    const limit = 5 / Math.sqrt(length);
    const unsignedR = pearson(update, masked);
    const signedR = pearson(update, signed);
    const plainR = pearson(update, plain);
    t.diagnostic(
      `r unsigned ${unsignedR.toFixed(4)}, signed ${signedR.toFixed(4)}`,
    );
    t.diagnostic(`r unmasked ${plainR.toFixed(6)}`);
    assert.ok(Math.abs(unsignedR) < limit, `unsigned words: r = ${unsignedR}`);
    assert.ok(Math.abs(signedR) < limit, `signed words: r = ${signedR}`);
    // Control: without masks the words track the update almost exactly.
    assert.ok(plainR > 0.999, `unmasked words: r = ${plainR}`);
  });
});
