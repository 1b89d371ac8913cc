import { createRandom, shuffleInPlace } from '../models/random.ts';

/**
 * Picks the vehicles of one round: `count` of `online` (all of them when
 * `count` is 0 or at least their number), drawn without replacement. The
 * draw depends only on the set of online ids, `seed` and `round`, so a
 * restarted aggregator repeats it. Returns ids sorted.
 *
 * @throws {RangeError} for a negative or fractional `count`.
 */
export function selectVehicles(
  online: Iterable<string>,
  count: number,
  seed: number,
  round: number,
): string[] {
  if (!Number.isSafeInteger(count) || count < 0) {
    throw new RangeError(`count must be an integer >= 0, got ${count}`);
  }
  const candidates = [...new Set(online)].sort();
  if (count === 0 || count >= candidates.length) return candidates;

  // Mix the round into the seed so that each round draws a new sample.
  const random = createRandom(mixSeed(seed, round));
  return shuffleInPlace(candidates, random).slice(0, count).sort();
}

function mixSeed(seed: number, round: number): number {
  return (Math.imul(round, 0x9e3779b1) ^ seed) >>> 0;
}
