import { randomBytes } from 'node:crypto';
import {
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { ErrorCode, FleetError } from '../protocol/index.ts';

/** Progress that must survive a restart (stateDir/state.json). */
export interface AggregatorState {
  /** Last round number opened; the next round is `round + 1`. */
  round: number;
  /** Current global model version. */
  modelVersion: number;
}

const STATE_FILE = 'state.json';

/**
 * Writes `data` to `path` through a temporary file in the same directory
 * and a rename, so a reader sees the old or the new file, never a part.
 */
export function writeFileAtomic(path: string, data: Uint8Array | string): void {
  mkdirSync(dirname(path), { recursive: true });
  const temporary = `${path}.${randomBytes(6).toString('hex')}.tmp`;
  try {
    writeFileSync(temporary, data, { flush: true });
    renameSync(temporary, path);
  } catch (err) {
    rmSync(temporary, { force: true });
    throw err;
  }
}

/**
 * Reads stateDir/state.json; returns undefined when it does not exist.
 *
 * @throws {FleetError} INVALID_CONFIG when the file is not valid state.
 */
export function loadState(stateDir: string): AggregatorState | undefined {
  const path = join(stateDir, STATE_FILE);
  if (!existsSync(path)) return undefined;

  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot read aggregator state ${path}: ${(err as Error).message}`,
      { cause: err },
    );
  }
  const { round, modelVersion } = (parsed ?? {}) as Record<string, unknown>;
  if (!isCount(round) || !isCount(modelVersion)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `aggregator state ${path} needs integer fields round and ` +
        `modelVersion >= 0, got ${JSON.stringify(parsed)}`,
    );
  }
  return { round, modelVersion };
}

function isCount(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

/** Writes stateDir/state.json atomically. */
export function saveState(stateDir: string, state: AggregatorState): void {
  const text = JSON.stringify(
    { round: state.round, modelVersion: state.modelVersion },
    null,
    2,
  );
  writeFileAtomic(join(stateDir, STATE_FILE), `${text}\n`);
}
