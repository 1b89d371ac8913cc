/**
 * The deployed model on disk. The state directory contains
 * `models/v<version>.onnx` files and `current.json`, which names the file
 * in service and the one before it (for rollback). Both are written to a
 * temporary file and renamed, so a crash leaves the old or the new state,
 * never a mix.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import { sha256Hex } from '../models/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';

/** One model file named by `current.json`. */
export interface ModelFileRecord {
  modelName: string;
  version: number;
  /** Hex SHA-256 of the ONNX bytes. */
  sha256: string;
  /** Path relative to the state directory. */
  file: string;
}

/** Contents of `current.json`. */
export interface CurrentPointer extends ModelFileRecord {
  deployedAtMs: number;
  previous: ModelFileRecord | null;
}

/** A model file read back from the state directory, digest checked. */
export interface StoredModel extends ModelFileRecord {
  onnx: Uint8Array;
}

const POINTER_FILE = 'current.json';

/** Relative path of the ONNX file of `version`. */
export function modelFileOf(version: number): string {
  return path.join('models', `v${version}.onnx`);
}

/** Writes `bytes` to `target` through a temporary file, fsync and rename. */
export async function writeFileAtomic(
  target: string,
  bytes: Uint8Array | string,
): Promise<void> {
  await mkdir(path.dirname(target), { recursive: true });
  const temp = `${target}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const handle = await open(temp, 'w');
  try {
    await handle.writeFile(bytes);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await rename(temp, target);
  } catch (err) {
    await rm(temp, { force: true });
    throw err;
  }
}

/** Writes the ONNX file of a model into `stateDir`. */
export async function writeModelFile(
  stateDir: string,
  version: number,
  onnx: Uint8Array,
): Promise<string> {
  const file = modelFileOf(version);
  await writeFileAtomic(path.join(stateDir, file), onnx);
  return file;
}

/** Points `current.json` at a model file. */
export async function writePointer(
  stateDir: string,
  pointer: CurrentPointer,
): Promise<void> {
  const text = `${JSON.stringify(pointer, null, 2)}\n`;
  await writeFileAtomic(path.join(stateDir, POINTER_FILE), text);
}

/** Deletes a model file, ignoring one that is already gone. */
export async function removeModelFile(
  stateDir: string,
  file: string,
): Promise<void> {
  await rm(path.join(stateDir, file), { force: true });
}

function isRecord(value: unknown): value is ModelFileRecord {
  if (value === null || typeof value !== 'object') return false;
  const record = value as Record<string, unknown>;
  return (
    typeof record.modelName === 'string' &&
    Number.isSafeInteger(record.version) &&
    typeof record.sha256 === 'string' &&
    typeof record.file === 'string'
  );
}

/**
 * Reads `current.json`, or returns undefined when the state directory has
 * none (nothing deployed yet).
 *
 * @throws {FleetError} INVALID_MODEL when the file is not a valid pointer.
 */
export async function readPointer(
  stateDir: string,
): Promise<CurrentPointer | undefined> {
  const target = path.join(stateDir, POINTER_FILE);
  let text: string;
  try {
    text = await readFile(target, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `${target} is not valid JSON; delete it to start without a model`,
      { cause: err },
    );
  }
  const pointer = parsed as CurrentPointer;
  if (
    !isRecord(pointer) ||
    !(pointer.previous === null || isRecord(pointer.previous))
  ) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `${target} lacks modelName, version, sha256 or file; delete it to ` +
        'start without a model',
    );
  }
  return pointer;
}

/**
 * Reads a model file named by `record` and checks its SHA-256.
 *
 * @throws {FleetError} INVALID_MODEL when the file is missing or its
 *   digest differs from the record.
 */
export async function readModelFile(
  stateDir: string,
  record: ModelFileRecord,
): Promise<StoredModel> {
  const target = path.join(stateDir, record.file);
  let onnx: Uint8Array;
  try {
    onnx = new Uint8Array(await readFile(target));
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `cannot read model version ${record.version} from ${target}: ` +
        (err as Error).message,
      { cause: err },
    );
  }
  const digest = sha256Hex(onnx);
  if (digest !== record.sha256) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `model file ${target} has SHA-256 ${digest}, but current.json ` +
        `records ${record.sha256}`,
    );
  }
  return { ...record, onnx };
}

/**
 * Reads the model in service from `stateDir`, for the classify command.
 *
 * @throws {FleetError} INVALID_MODEL when nothing is deployed there or the
 *   files are damaged.
 */
export async function readDeployedModel(
  stateDir: string,
): Promise<StoredModel> {
  const pointer = await readPointer(stateDir);
  if (pointer === undefined) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `no model deployed in ${stateDir} (no ${POINTER_FILE}); run the agent ` +
        'until it receives a release, or pass --model FILE.onnx',
    );
  }
  return readModelFile(stateDir, pointer);
}
