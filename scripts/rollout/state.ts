/**
 * The rollout state file, `rollout.json` in the rollout directory. It is
 * written to a temporary file and renamed, so a crash leaves the old or
 * the new state, and a restarted controller resumes the stage it was in.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { writeFileAtomic } from '../../aggregator/state.ts';
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import {
  checkGates,
  type GateEvaluation,
  type GateThresholds,
} from './gates.ts';

/** Name of the state file in the rollout directory. */
export const STATE_FILE = 'rollout.json';

/** Format of the state file this code writes. */
export const STATE_FORMAT = 1;

/** One stage: the cohort share and whether the cohort only shadows. */
export interface RolloutStage {
  /** Percent of the vehicles matching the cohort tags, 0 to 100. */
  percent: number;
  shadow: boolean;
}

/** One event of a rollout, for `status` and the audit trail. */
export interface RolloutEvent {
  atMs: number;
  event: 'started' | 'stage' | 'promoted' | 'rolled-back' | 'pinned';
  stage?: number;
  version?: number;
  reason?: string;
}

/** The state of a rollout. */
export type RolloutStatus = 'active' | 'promoted' | 'rolled-back' | 'pinned';

/** Contents of the state file. */
export interface RolloutState {
  format: number;
  fleetId: string;
  modelName: string;
  rolloutId: string;
  /** Salt of the cohort hash; fixed for the rollout so cohorts only grow. */
  hashSalt: string;
  version: number;
  sha256: string;
  stableVersion: number;
  stableSha256: string;
  stages: RolloutStage[];
  stageIndex: number;
  stageStartedAtMs: number;
  cohortTags: Record<string, string>;
  vehicleIds: string[];
  status: RolloutStatus;
  gates: GateThresholds;
  lastEvaluation?: GateEvaluation & { atMs: number; stage: number };
  history: RolloutEvent[];
}

/**
 * Parses `--stages 10,50,100`: percents from 0 to 100, not decreasing,
 * so that each cohort contains the one before.
 *
 * @throws {RangeError} naming the bad entry.
 */
export function parseStages(
  text: string,
  shadowFirst: boolean,
): RolloutStage[] {
  const parts = text.split(',').map((part) => part.trim());
  const percents = parts.map((part) => {
    const value = Number(part);
    if (part === '' || !Number.isFinite(value) || value < 0 || value > 100) {
      throw new RangeError(
        `stage ${JSON.stringify(part)} in --stages ${JSON.stringify(text)} ` +
          'is not a percent from 0 to 100',
      );
    }
    return value;
  });
  for (let i = 1; i < percents.length; i++) {
    if (percents[i] < percents[i - 1]) {
      throw new RangeError(
        `--stages ${text} goes down from ${percents[i - 1]} to ` +
          `${percents[i]}; each stage must cover the one before`,
      );
    }
  }
  const stages = percents.map((percent) => ({ percent, shadow: false }));
  return shadowFirst
    ? [{ percent: percents[0], shadow: true }, ...stages]
    : stages;
}

/** Path of the state file in `rolloutDir`. */
export function statePathOf(rolloutDir: string): string {
  return path.join(rolloutDir, STATE_FILE);
}

/** Writes the state atomically. */
export function writeState(rolloutDir: string, state: RolloutState): void {
  writeFileAtomic(
    statePathOf(rolloutDir),
    `${JSON.stringify(state, null, 2)}\n`,
  );
}

function invalid(file: string, problem: string): FleetError {
  return new FleetError(
    ErrorCode.InvalidConfig,
    `rollout state ${file} ${problem}; fix or delete it (the candidate ` +
      'notice on the broker stays until a new rollout or a pin replaces it)',
  );
}

/**
 * Reads the state file, or returns undefined when there is none.
 *
 * @throws {FleetError} INVALID_CONFIG when it is not JSON, has another
 *   format, or lacks a field.
 */
export function readState(rolloutDir: string): RolloutState | undefined {
  const file = statePathOf(rolloutDir);
  if (!existsSync(file)) return undefined;
  let parsed: Partial<RolloutState>;
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8')) as Partial<RolloutState>;
  } catch (err) {
    throw invalid(file, `is not valid JSON (${(err as Error).message})`);
  }
  if (parsed === null || typeof parsed !== 'object') {
    throw invalid(file, 'is not a JSON object');
  }
  if (parsed.format !== STATE_FORMAT) {
    throw invalid(
      file,
      `has format ${String(parsed.format)}, expected ${STATE_FORMAT}`,
    );
  }
  const integers = [
    'version',
    'stableVersion',
    'stageIndex',
    'stageStartedAtMs',
  ] as const;
  for (const name of integers) {
    if (!Number.isSafeInteger(parsed[name])) {
      throw invalid(
        file,
        `has ${name} ${String(parsed[name])}, expected an integer`,
      );
    }
  }
  const texts = [
    'rolloutId',
    'hashSalt',
    'sha256',
    'stableSha256',
    'status',
    'fleetId',
  ] as const;
  for (const name of texts) {
    if (typeof parsed[name] !== 'string') {
      throw invalid(file, `has no ${name}`);
    }
  }
  if (!Array.isArray(parsed.stages) || parsed.stages.length === 0) {
    throw invalid(file, 'has no stages');
  }
  if (parsed.stageIndex! < 0 || parsed.stageIndex! >= parsed.stages.length) {
    throw invalid(
      file,
      `has stageIndex ${parsed.stageIndex} for ${parsed.stages.length} stages`,
    );
  }
  try {
    checkGates(parsed.gates as GateThresholds);
  } catch (err) {
    throw invalid(file, (err as Error).message);
  }
  return parsed as RolloutState;
}
