/**
 * Retention of stored versions. Prune keeps every version a rollback or
 * a vehicle may still need, and deletes the rest:
 *
 * - the current version and its nearest ancestors, `keep` in all: the
 *   versions the fleet ran, which `--rollback-to` can return to;
 * - version 0, the base model every lineage starts from;
 * - pinned versions;
 * - versions whose release chunks the broker may retain (releases.json):
 *   the current and previous release, which vehicles keep for rollback;
 * - versions above the current one stored after state.json was last
 *   written: a round that is being committed saves its version before
 *   it updates state.json.
 *
 * Versions above the current one that are older than state.json were
 * withdrawn by a rollback and are deleted like any other.
 *
 * A version whose manifest is damaged is deleted only when the rules
 * above delete it whatever the manifest contains: it is not the current
 * version, version 0, pinned, retained or within the `keep` nearest
 * ancestors. Otherwise prune deletes nothing and names it, because
 * deciding would need the lost manifest (its parent, for the lineage),
 * or the operator may still repair it.
 */
import { existsSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import { describeFileError } from './file-errors.ts';
import { VERSION_FILE_KINDS } from './layout.ts';
import type { ModelRegistry } from './store.ts';

/** Reason a version is kept. */
export type KeepReason =
  | 'current'
  | 'lineage'
  | 'base'
  | 'pinned'
  | 'retained-release'
  | 'in-progress';

/** Versions prune keeps, with the reasons, and those it deletes. */
export interface PrunePlan {
  current: number;
  keep: Array<{ version: number; reasons: KeepReason[] }>;
  remove: number[];
  /** Versions in `remove` whose manifest is damaged, with the reason. */
  damaged: Array<{ version: number; damage: string }>;
}

/** One deleted version. */
export interface PrunedVersion {
  version: number;
  files: string[];
  bytes: number;
}

function requireCurrent(registry: ModelRegistry): number {
  const current = registry.currentVersion();
  if (current === null) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `no state.json in ${registry.stateDir}, so the current version is ` +
        'unknown; prune needs the state directory of an aggregator that ' +
        'has started',
    );
  }
  registry.requireVersion(current);
  return current;
}

/**
 * Decides what `prune --keep keepCount` keeps and deletes. Nothing is
 * deleted here.
 *
 * @throws {RangeError} when `keepCount` is not an integer >= 1.
 * @throws {FleetError} INVALID_CONFIG without state.json or with a
 *   damaged pins.json, INVALID_MODEL when the current version is not
 *   stored or a version that would be kept has a damaged manifest.
 */
export function planPrune(
  registry: ModelRegistry,
  keepCount: number,
): PrunePlan {
  if (!Number.isSafeInteger(keepCount) || keepCount < 1) {
    throw new RangeError(
      `keep count is ${keepCount}, expected an integer >= 1 (the current ` +
        'version counts as one)',
    );
  }
  const current = requireCurrent(registry);
  const stateWrittenMs = statSync(
    path.join(registry.stateDir, 'state.json'),
  ).mtimeMs;
  const reasons = new Map<number, KeepReason[]>();
  const add = (version: number, reason: KeepReason): void => {
    reasons.set(version, [...(reasons.get(version) ?? []), reason]);
  };

  const stored = registry.versions();
  add(current, 'current');
  for (const version of registry.lineage(current, keepCount).slice(1)) {
    add(version, 'lineage');
  }
  if (stored.includes(0)) add(0, 'base');
  for (const version of registry.pins().keys()) {
    if (stored.includes(version)) add(version, 'pinned');
  }
  for (const version of registry.retainedReleaseVersions()) {
    if (stored.includes(version)) add(version, 'retained-release');
  }
  for (const version of stored.filter((v) => v > current)) {
    const savedMs = statSync(registry.pathOf(version, 'json')).mtimeMs;
    if (savedMs >= stateWrittenMs) add(version, 'in-progress');
  }

  const damaged = findDamaged(registry, stored);
  const keptDamaged = damaged.filter(({ version }) => reasons.has(version));
  if (keptDamaged.length > 0) {
    const list = keptDamaged
      .map(({ version, damage }) => `v${version} (${damage})`)
      .join('; ');
    throw new FleetError(
      ErrorCode.InvalidModel,
      'prune deletes nothing while a version it would keep has a ' +
        `damaged manifest: ${list}; restore those manifests first`,
    );
  }
  return {
    current,
    keep: [...reasons]
      .sort(([a], [b]) => a - b)
      .map(([version, why]) => ({ version, reasons: why })),
    remove: stored.filter((version) => !reasons.has(version)),
    damaged,
  };
}

function findDamaged(
  registry: ModelRegistry,
  versions: number[],
): PrunePlan['damaged'] {
  return versions
    .map((version) => ({ version, damage: registry.damageOf(version) }))
    .filter(
      (entry): entry is { version: number; damage: string } =>
        entry.damage !== null,
    );
}

/**
 * Deletes the versions `plan` removes, each manifest first, so that a
 * version stops counting as stored before its other files go.
 *
 * @throws {FleetError} INVALID_CONFIG naming the file that could not be
 *   deleted; the versions before it are already gone.
 */
export function applyPrune(
  registry: ModelRegistry,
  plan: PrunePlan,
): PrunedVersion[] {
  return plan.remove.map((version) => {
    const files: string[] = [];
    let bytes = 0;
    for (const kind of VERSION_FILE_KINDS) {
      const file = registry.pathOf(version, kind);
      if (!existsSync(file)) continue;
      bytes += statSync(file).size;
      try {
        rmSync(file);
      } catch (err) {
        throw new FleetError(
          ErrorCode.InvalidConfig,
          `cannot delete ${file} of model version ${version}: ` +
            describeFileError(err),
          { cause: err },
        );
      }
      files.push(file);
    }
    return { version, files, bytes };
  });
}
