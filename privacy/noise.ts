/**
 * Gaussian noise for DP-FedAvg (H. B. McMahan, D. Ramage, K. Talwar,
 * L. Zhang, "Learning Differentially Private Recurrent Language Models",
 * ICLR 2018, https://arxiv.org/abs/1710.06963).
 *
 * Convention: each selected vehicle's update is clipped to L2 norm C, the
 * clipped updates are summed with equal weights, noise N(0, (z C)^2) is
 * added to every coordinate of the sum, and the result is divided by the
 * fixed denominator m = q N, the expected number of vehicles per round
 * (sampling rate q, fleet size N), not by the number of updates received.
 * So the mean carries noise of standard deviation z C / m. Adding or
 * removing one vehicle changes the sum by at most C, the sensitivity the
 * accountant assumes.
 *
 * NOTE: equal weights are part of that argument. Weighting updates by
 * numExamples, as plain FedAvg does, would raise one vehicle's influence
 * above C unless the weights are capped and the noise scaled with them.
 */
import { randomFillSync } from 'node:crypto';
import type { WeightMap } from '../models/architecture.ts';
import { createRandom } from '../models/random.ts';

/** A source of independent standard normal samples. */
export type NormalSource = () => number;

/** Source of the uniform bits behind the normal samples. */
export type GaussianSourceOptions =
  { kind: 'seeded'; seed: number } | { kind: 'crypto' };

/** Uint32 words fetched from node:crypto per refill. */
const CRYPTO_BUFFER_WORDS = 4096;

const TWO_POW_32 = 2 ** 32;

/** Returns a function that yields uniform 32-bit words from node:crypto. */
function createCryptoWords(): () => number {
  const buffer = new Uint32Array(CRYPTO_BUFFER_WORDS);
  let next = buffer.length;
  return () => {
    if (next === buffer.length) {
      randomFillSync(buffer);
      next = 0;
    }
    return buffer[next++];
  };
}

/** Returns a function that yields uniform 32-bit words from mulberry32. */
function createSeededWords(seed: number): () => number {
  const random = createRandom(seed);
  // createRandom returns word / 2^32, so this recovers the word exactly.
  return () => random() * TWO_POW_32;
}

/**
 * Builds a standard normal source from uniform 32-bit words by the
 * Box-Muller transform, using both outputs of each transform. Each uniform
 * takes 53 bits from two words, so the largest sample magnitude is about
 * 8.6.
 */
function createBoxMuller(nextWord: () => number): NormalSource {
  const nextUniform = () =>
    ((nextWord() >>> 5) * 2 ** 26 + (nextWord() >>> 6)) / 2 ** 53;
  let spare: number | undefined;
  return () => {
    if (spare !== undefined) {
      const value = spare;
      spare = undefined;
      return value;
    }
    // 1 - u lies in (0, 1], so the logarithm stays finite.
    const radius = Math.sqrt(-2 * Math.log(1 - nextUniform()));
    const angle = 2 * Math.PI * nextUniform();
    spare = radius * Math.sin(angle);
    return radius * Math.cos(angle);
  };
}

/**
 * Creates a standard normal source. `{ kind: 'seeded', seed }` draws from
 * mulberry32 (models/random.ts), so equal seeds give equal noise, for
 * tests and reproducible simulations. `{ kind: 'crypto' }` draws from
 * node:crypto.
 *
 * NOTE: seeded noise is predictable and gives no privacy: a production
 * deployment must use `{ kind: 'crypto' }`. Even then the samples are
 * floating-point Box-Muller values, and numerical errors of such samplers
 * can break the guarantee. Canonne, Kamath and Steinke ("The Discrete
 * Gaussian for Differential Privacy", 2020,
 * https://arxiv.org/abs/2004.00010) describe the problem and give an
 * exact discrete sampler.
 *
 * @throws {RangeError} when the seed is not a safe integer.
 */
export function createGaussianSource(
  options: GaussianSourceOptions,
): NormalSource {
  if (options.kind === 'crypto') return createBoxMuller(createCryptoWords());
  return createBoxMuller(createSeededWords(options.seed));
}

/** Settings of the DP-FedAvg noise. */
export interface DpNoiseOptions {
  /** z, noise standard deviation over the clipping norm, >= 0. */
  noiseMultiplier: number;
  /** C, the L2 norm each update was clipped to, > 0. */
  clipNorm: number;
  /** m = q N, the fixed denominator of the mean, > 0 and not always whole. */
  expectedVehicles: number;
}

function checkDpNoiseOptions(options: DpNoiseOptions): void {
  const { noiseMultiplier, clipNorm, expectedVehicles } = options;
  if (!(noiseMultiplier >= 0) || !Number.isFinite(noiseMultiplier)) {
    throw new RangeError(
      `noise multiplier must be a finite number >= 0, got ${noiseMultiplier}`,
    );
  }
  if (!(clipNorm > 0) || !Number.isFinite(clipNorm)) {
    throw new RangeError(
      `clip norm must be a positive finite number, got ${clipNorm}`,
    );
  }
  if (!(expectedVehicles > 0) || !Number.isFinite(expectedVehicles)) {
    throw new RangeError(
      `expected vehicles per round must be a positive finite number, ` +
        `got ${expectedVehicles}`,
    );
  }
}

/**
 * Returns the noise standard deviation on the mean, z C / m.
 *
 * @throws {RangeError} when an option is out of range (see DpNoiseOptions).
 */
export function computeMeanNoiseStdDev(options: DpNoiseOptions): number {
  checkDpNoiseOptions(options);
  return (
    (options.noiseMultiplier * options.clipNorm) / options.expectedVehicles
  );
}

/**
 * Returns a copy of `tensors` with independent N(0, stdDev^2) noise added
 * to every value. Sums are formed in float64 and rounded once to float32.
 *
 * @throws {RangeError} when stdDev is negative or not finite.
 */
export function addGaussianNoise(
  tensors: ReadonlyMap<string, Float32Array>,
  stdDev: number,
  normal: NormalSource,
): WeightMap {
  if (!(stdDev >= 0) || !Number.isFinite(stdDev)) {
    throw new RangeError(
      `noise standard deviation must be a finite number >= 0, got ${stdDev}`,
    );
  }
  const noisy: WeightMap = new Map();
  for (const [name, values] of tensors) {
    const copy = new Float32Array(values.length);
    for (let i = 0; i < values.length; i++) {
      copy[i] = values[i] + stdDev * normal();
    }
    noisy.set(name, copy);
  }
  return noisy;
}

/**
 * Computes the DP-FedAvg mean of a round: (sum + N(0, (z C)^2)) / m for
 * every value, where `clippedSum` is the equal-weight sum of the selected
 * vehicles' clipped updates.
 *
 * @throws {RangeError} when an option is out of range (see DpNoiseOptions).
 */
export function computeNoisyMean(
  clippedSum: ReadonlyMap<string, Float32Array>,
  options: DpNoiseOptions,
  normal: NormalSource,
): WeightMap {
  checkDpNoiseOptions(options);
  const sumStdDev = options.noiseMultiplier * options.clipNorm;
  const mean: WeightMap = new Map();
  for (const [name, values] of clippedSum) {
    const copy = new Float32Array(values.length);
    for (let i = 0; i < values.length; i++) {
      const noisySum = values[i] + sumStdDev * normal();
      copy[i] = noisySum / options.expectedVehicles;
    }
    mean.set(name, copy);
  }
  return mean;
}
