/**
 * Reads the ONNX and weights files of a stored version, checking the ONNX
 * file against the SHA-256 its manifest records.
 */
import { existsSync, readFileSync } from 'node:fs';
import { ErrorCode, FleetError, isFleetError } from '../../protocol/index.ts';
import type { WeightMap } from '../architecture.ts';
import { sha256Hex } from '../runtime.ts';
import { readWeightsFile } from '../weights-file.ts';
import { fileReadError } from './file-errors.ts';
import type { ModelRegistry } from './store.ts';

/** Outcome of {@link checkOnnx}. */
export interface OnnxCheck {
  file: string;
  /** Null when the file matches the manifest's SHA-256, else why not. */
  problem: string | null;
}

/**
 * Reads the ONNX file of `version` and checks it against the manifest.
 *
 * @throws {FleetError} INVALID_MODEL when it is missing, cannot be read
 *   or its digest differs.
 */
export function readOnnx(registry: ModelRegistry, version: number): Uint8Array {
  const { onnx, problem } = loadOnnx(registry, version);
  if (onnx === undefined) {
    throw new FleetError(ErrorCode.InvalidModel, problem);
  }
  return onnx;
}

/**
 * Checks the ONNX file of `version` against the SHA-256 and size in its
 * manifest. Returns the problem instead of throwing it, so that `show`
 * can still print the rest of the version.
 *
 * @throws {FleetError} INVALID_MODEL when the manifest is damaged.
 */
export function checkOnnx(registry: ModelRegistry, version: number): OnnxCheck {
  const loaded = loadOnnx(registry, version);
  return {
    file: registry.pathOf(version, 'onnx'),
    problem: loaded.onnx === undefined ? loaded.problem : null,
  };
}

type LoadedOnnx =
  { onnx: Uint8Array; problem: null } | { onnx: undefined; problem: string };

function loadOnnx(registry: ModelRegistry, version: number): LoadedOnnx {
  const { sha256, sizeBytes } = registry.manifest(version);
  const file = registry.pathOf(version, 'onnx');
  if (!existsSync(file)) {
    return {
      onnx: undefined,
      problem: `model version ${version} has a manifest but no ONNX file ${file}`,
    };
  }
  let onnx: Uint8Array;
  try {
    onnx = new Uint8Array(readFileSync(file));
  } catch (err) {
    const { message } = fileReadError(
      ErrorCode.InvalidModel,
      'ONNX file',
      file,
      err,
    );
    return { onnx: undefined, problem: message };
  }
  const digest = sha256Hex(onnx);
  if (digest === sha256) return { onnx, problem: null };
  const recorded = sizeBytes === null ? '' : ` (${sizeBytes} bytes)`;
  return {
    onnx: undefined,
    problem:
      `${file} has SHA-256 ${digest} (${onnx.length} bytes), but its ` +
      `manifest records ${sha256}${recorded}`,
  };
}

/**
 * Reads the weights of a stored version.
 *
 * @throws {FleetError} INVALID_MODEL when the version is not stored, or
 *   its weights file is missing, cannot be read or does not match the
 *   architecture.
 */
export function readWeights(
  registry: ModelRegistry,
  version: number,
): WeightMap {
  registry.requireVersion(version);
  const file = registry.pathOf(version, 'weights.pb');
  if (!existsSync(file)) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `model version ${version} has a manifest but no weights file ${file}`,
    );
  }
  try {
    return readWeightsFile(file);
  } catch (err) {
    if (isFleetError(err)) throw err;
    throw fileReadError(ErrorCode.InvalidModel, 'weights file', file, err);
  }
}
