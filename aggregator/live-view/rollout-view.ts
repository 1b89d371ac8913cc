/**
 * The live view's summary of a staged rollout, read from the rollout
 * controller's state file (`rollout.json` in the aggregator's state
 * directory, see scripts/rollout/state.ts). The controller is a separate
 * process, so the file is the one place both can see.
 */
import { readFileSync } from 'node:fs';

/** Figures of one version in the last gate evaluation. */
export type VersionFiguresView = Record<string, number | null>;

/** The part of a rollout's state that the page shows. */
export interface RolloutView {
  rolloutId: string;
  version: number;
  stableVersion: number;
  /** For example active, promoted, rolled-back or pinned. */
  status: string;
  /** 0-based index of the current stage. */
  stageIndex: number;
  stages: Array<{ percent: number; shadow: boolean }>;
  stageStartedAtMs: number;
  cohortTags: Record<string, string>;
  listedVehicles: number;
  lastEvaluation: {
    atMs: number;
    decision: string;
    reason: string;
    reportedVehicles: number;
    required: number;
    cohortVehicles: number;
    failures: string[];
    candidate: VersionFiguresView | null;
    stable: VersionFiguresView | null;
  } | null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function figuresOf(value: unknown): VersionFiguresView | null {
  if (!isRecord(value)) return null;
  const figures: VersionFiguresView = {};
  for (const [key, entry] of Object.entries(value)) {
    if (typeof entry === 'number' || entry === null) figures[key] = entry;
  }
  return figures;
}

/**
 * Reads the rollout state at `path`, or returns null when there is no
 * file. A file that cannot be read or parsed also gives null, and
 * `onError` receives the reason. A half-written file thus never breaks
 * the page.
 */
export function readRolloutView(
  path: string,
  onError: (err: unknown) => void,
): RolloutView | null {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') onError(err);
    return null;
  }
  try {
    const state: unknown = JSON.parse(text);
    if (!isRecord(state) || !Array.isArray(state.stages)) {
      throw new Error('expected a rollout state object with stages');
    }
    const evaluation = isRecord(state.lastEvaluation)
      ? state.lastEvaluation
      : undefined;
    return {
      rolloutId: String(state.rolloutId ?? ''),
      version: Number(state.version),
      stableVersion: Number(state.stableVersion),
      status: String(state.status ?? 'unknown'),
      stageIndex: Number(state.stageIndex),
      stages: state.stages.map((stage: unknown) => ({
        percent: isRecord(stage) ? Number(stage.percent) : Number.NaN,
        shadow: isRecord(stage) && stage.shadow === true,
      })),
      stageStartedAtMs: Number(state.stageStartedAtMs),
      cohortTags: isRecord(state.cohortTags)
        ? (state.cohortTags as Record<string, string>)
        : {},
      listedVehicles: Array.isArray(state.vehicleIds)
        ? state.vehicleIds.length
        : 0,
      lastEvaluation:
        evaluation === undefined
          ? null
          : {
              atMs: Number(evaluation.atMs),
              decision: String(evaluation.decision),
              reason: String(evaluation.reason ?? ''),
              reportedVehicles: Number(evaluation.reportedVehicles),
              required: Number(evaluation.required),
              cohortVehicles: Number(evaluation.cohortVehicles),
              failures: Array.isArray(evaluation.failures)
                ? evaluation.failures.map(String)
                : [],
              candidate: figuresOf(evaluation.candidate),
              stable: figuresOf(evaluation.stable),
            },
    };
  } catch (err) {
    onError(err);
    return null;
  }
}
