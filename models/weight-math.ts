import type { WeightMap } from './architecture.ts';

/**
 * Returns `weights` with `deltas` added to the tensors they name; the
 * other tensors are shared, not copied.
 *
 * @throws {RangeError} when a delta names a tensor that `weights` lacks or
 *   has a different size.
 */
export function applyDeltas(
  weights: ReadonlyMap<string, Float32Array>,
  deltas: ReadonlyMap<string, Float32Array>,
): WeightMap {
  const next: WeightMap = new Map(weights);
  for (const [name, delta] of deltas) {
    const base = weights.get(name);
    if (base === undefined) {
      throw new RangeError(`delta for unknown tensor ${name}`);
    }
    if (base.length !== delta.length) {
      throw new RangeError(
        `delta for ${name} has ${delta.length} values, expected ${base.length}`,
      );
    }
    const updated = new Float32Array(base.length);
    for (let i = 0; i < base.length; i++) updated[i] = base[i] + delta[i];
    next.set(name, updated);
  }
  return next;
}
