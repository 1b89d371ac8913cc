/**
 * Pinned versions (`pins.json` beside the version files): versions an
 * operator keeps for a later rollback or audit, whatever the retention.
 */
import { randomBytes } from 'node:crypto';
import {
  existsSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { ErrorCode, FleetError } from '../../protocol/index.ts';

/** Record of one pin: the version, the reason and the time. */
export interface Pin {
  version: number;
  reason: string;
  /** ISO 8601 time of pinning. */
  pinnedAt: string;
}

const PINS_FILE = 'pins.json';

function pinsPath(modelDir: string): string {
  return path.join(modelDir, PINS_FILE);
}

function isPin(value: unknown): value is Pin {
  const pin = value as Partial<Pin> | null;
  return (
    typeof pin === 'object' &&
    pin !== null &&
    Number.isSafeInteger(pin.version) &&
    typeof pin.reason === 'string' &&
    typeof pin.pinnedAt === 'string'
  );
}

/**
 * Reads the pins of the store in `modelDir`; none when the file is absent.
 *
 * @throws {FleetError} INVALID_CONFIG when pins.json is damaged, because
 *   pruning without it could delete a pinned version.
 */
export function readPins(modelDir: string): Map<number, Pin> {
  const file = pinsPath(modelDir);
  if (!existsSync(file)) return new Map();
  let pins: unknown;
  try {
    pins = (JSON.parse(readFileSync(file, 'utf8')) as { pins?: unknown }).pins;
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot read ${file}: ${(err as Error).message}; fix or delete it`,
      { cause: err },
    );
  }
  if (!Array.isArray(pins) || !pins.every(isPin)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `${file} needs a "pins" list of { version, reason, pinnedAt }; fix ` +
        'or delete it',
    );
  }
  return new Map(pins.map((pin) => [pin.version, pin]));
}

/** Writes `pins` to pins.json through a temporary file and a rename. */
export function writePins(modelDir: string, pins: Map<number, Pin>): void {
  const file = pinsPath(modelDir);
  const sorted = [...pins.values()].sort((a, b) => a.version - b.version);
  const temporary = `${file}.${randomBytes(6).toString('hex')}.tmp`;
  try {
    writeFileSync(temporary, `${JSON.stringify({ pins: sorted }, null, 2)}\n`);
    renameSync(temporary, file);
  } catch (err) {
    rmSync(temporary, { force: true });
    throw err;
  }
}
