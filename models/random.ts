/**
 * Seeded pseudo-random numbers for data splits and sampling. Every split in
 * fleetlearn takes an explicit seed, so a run can be repeated exactly.
 */

/**
 * Creates a seeded PRNG that returns numbers in [0, 1).
 *
 * The generator is mulberry32: 32-bit state, period 2^32, fast and good
 * enough for shuffles and splits, not for cryptography. Equal seeds give
 * equal sequences.
 *
 * @param seed any safe integer; it is reduced to 32 bits.
 * @throws {RangeError} when `seed` is not a safe integer.
 */
export function createRandom(seed: number): () => number {
  if (!Number.isSafeInteger(seed)) {
    throw new RangeError(`seed must be a safe integer, got ${seed}`);
  }
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Draws a standard normal sample (Box-Muller transform). */
export function sampleNormal(random: () => number): number {
  // 1 - u lies in (0, 1], so the logarithm stays finite.
  const u = 1 - random();
  const v = random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
}

/**
 * Draws a Gamma(shape, 1) sample with the Marsaglia-Tsang method ("A simple
 * method for generating gamma variables", ACM TOMS 26(3), 2000). For
 * shape < 1 it uses Gamma(shape + 1) * U^(1 / shape), as that paper suggests.
 *
 * @throws {RangeError} when `shape` is not a positive finite number.
 */
export function sampleGamma(shape: number, random: () => number): number {
  if (!(shape > 0) || !Number.isFinite(shape)) {
    throw new RangeError(`gamma shape must be positive, got ${shape}`);
  }
  if (shape < 1) {
    const u = 1 - random();
    return sampleGamma(shape + 1, random) * Math.pow(u, 1 / shape);
  }

  const d = shape - 1 / 3;
  const c = 1 / Math.sqrt(9 * d);
  for (;;) {
    let x: number;
    let v: number;
    do {
      x = sampleNormal(random);
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const u = 1 - random();
    if (u < 1 - 0.0331 * x * x * x * x) return d * v;
    if (Math.log(u) < 0.5 * x * x + d * (1 - v + Math.log(v))) return d * v;
  }
}

/**
 * Draws proportions from a symmetric Dirichlet(alpha) over `size` parts.
 * The result sums to 1. When every Gamma draw underflows to zero (possible
 * for alpha far below 0.01), all mass goes to one uniformly chosen part,
 * which is the limit of the distribution as alpha goes to zero.
 */
export function sampleDirichlet(
  size: number,
  alpha: number,
  random: () => number,
): number[] {
  const draws = Array.from({ length: size }, () => sampleGamma(alpha, random));
  const total = draws.reduce((sum, value) => sum + value, 0);
  if (total > 0) return draws.map((value) => value / total);

  const proportions = new Array<number>(size).fill(0);
  proportions[Math.floor(random() * size)] = 1;
  return proportions;
}

/** Shuffles `items` in place (Fisher-Yates) and returns it. */
export function shuffleInPlace<T>(items: T[], random: () => number): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    const swap = items[i];
    items[i] = items[j];
    items[j] = swap;
  }
  return items;
}
