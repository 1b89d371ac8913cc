/**
 * Comparison of two stored versions: the manifest fields that differ,
 * how far each weight tensor moved, and the change in accuracy and
 * latency measured at release.
 */
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import type { RegistryManifest } from './manifest.ts';
import type { ModelRegistry } from './store.ts';
import { readWeights } from './version-files.ts';

/** Change of one weight tensor from version A to version B. */
export interface TensorChange {
  name: string;
  /** L2 norm of B - A. */
  l2Norm: number;
  /** l2Norm divided by the L2 norm of A; null when A is all zeros. */
  relativeChange: number | null;
  /** Largest |B - A| of one element. */
  maxAbsChange: number;
}

/** A manifest field whose value differs, as JSON values. */
export interface FieldDifference {
  field: keyof RegistryManifest;
  a: unknown;
  b: unknown;
}

/** Result of {@link compareVersions}. */
export interface VersionComparison {
  a: number;
  b: number;
  /**
   * Relation of the two versions through parentVersion; unknown when a
   * damaged manifest cuts a chain short before the other version.
   */
  relation:
    'same' | 'a-ancestor-of-b' | 'b-ancestor-of-a' | 'unrelated' | 'unknown';
  fields: FieldDifference[];
  tensors: TensorChange[];
  /** L2 norm of B - A over every tensor. */
  totalL2Norm: number;
  /** B minus A; null when either is unknown. */
  accuracyDelta: number | null;
  latencyP50DeltaMs: number | null;
  latencyP95DeltaMs: number | null;
}

/** Fields that are not compared: they always differ or name the version. */
const SKIPPED_FIELDS = new Set<keyof RegistryManifest>(['version']);

function differingFields(
  a: RegistryManifest,
  b: RegistryManifest,
): FieldDifference[] {
  const fields = Object.keys(a) as Array<keyof RegistryManifest>;
  return fields
    .filter((field) => !SKIPPED_FIELDS.has(field))
    .filter((field) => JSON.stringify(a[field]) !== JSON.stringify(b[field]))
    .map((field) => ({ field, a: a[field], b: b[field] }));
}

function deltaOf(a: number | null, b: number | null): number | null {
  return a === null || b === null ? null : b - a;
}

/**
 * Measures how each tensor moved from `a` to `b`. Accumulates in float64,
 * so that small changes to large tensors do not vanish in rounding.
 *
 * @throws {FleetError} INVALID_MODEL when the two versions do not have
 *   the same tensors with the same sizes.
 */
export function tensorChanges(
  a: Map<string, Float32Array>,
  b: Map<string, Float32Array>,
): TensorChange[] {
  const names = [...new Set([...a.keys(), ...b.keys()])].sort();
  return names.map((name) => {
    const before = a.get(name);
    const after = b.get(name);
    if (before === undefined || after === undefined) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `tensor ${name} exists in only one of the two versions`,
      );
    }
    if (before.length !== after.length) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `tensor ${name} has ${before.length} values in one version and ` +
          `${after.length} in the other`,
      );
    }
    let squared = 0;
    let baseSquared = 0;
    let maxAbsChange = 0;
    for (let i = 0; i < before.length; i++) {
      const change = after[i] - before[i];
      squared += change * change;
      baseSquared += before[i] * before[i];
      maxAbsChange = Math.max(maxAbsChange, Math.abs(change));
    }
    const l2Norm = Math.sqrt(squared);
    const relativeChange =
      baseSquared > 0 ? l2Norm / Math.sqrt(baseSquared) : null;
    return { name, l2Norm, relativeChange, maxAbsChange };
  });
}

function relationOf(
  registry: ModelRegistry,
  a: number,
  b: number,
): VersionComparison['relation'] {
  if (a === b) return 'same';
  const ancestorsOfB = registry.lineage(b);
  if (ancestorsOfB.includes(a)) return 'a-ancestor-of-b';
  const ancestorsOfA = registry.lineage(a);
  if (ancestorsOfA.includes(b)) return 'b-ancestor-of-a';
  const isHidden =
    isCutShortAbove(registry, ancestorsOfB, a) ||
    isCutShortAbove(registry, ancestorsOfA, b);
  return isHidden ? 'unknown' : 'unrelated';
}

/**
 * Returns true when `chain` ends at a damaged manifest above `version`,
 * so `version` may be an ancestor the chain could not reach. Ancestors
 * are always older, so a chain cut short below `version` cannot hide it.
 */
function isCutShortAbove(
  registry: ModelRegistry,
  chain: number[],
  version: number,
): boolean {
  const last = chain[chain.length - 1];
  return last > version && registry.damageOf(last) !== null;
}

/**
 * Compares stored versions `a` and `b` (B minus A in every delta).
 *
 * @throws {FleetError} INVALID_MODEL when either is not stored or their
 *   tensors do not match.
 */
export function compareVersions(
  registry: ModelRegistry,
  a: number,
  b: number,
): VersionComparison {
  const manifestA = registry.manifest(a);
  const manifestB = registry.manifest(b);
  const tensors = tensorChanges(
    readWeights(registry, a),
    readWeights(registry, b),
  );
  const totalSquared = tensors.reduce((sum, t) => sum + t.l2Norm ** 2, 0);
  return {
    a,
    b,
    relation: relationOf(registry, a, b),
    fields: differingFields(manifestA, manifestB),
    tensors,
    totalL2Norm: Math.sqrt(totalSquared),
    accuracyDelta: deltaOf(manifestA.testAccuracy, manifestB.testAccuracy),
    latencyP50DeltaMs: deltaOf(
      manifestA.latency?.p50Ms ?? null,
      manifestB.latency?.p50Ms ?? null,
    ),
    latencyP95DeltaMs: deltaOf(
      manifestA.latency?.p95Ms ?? null,
      manifestB.latency?.p95Ms ?? null,
    ),
  };
}
