/**
 * Model weights on disk: one protobuf ModelWeights message (fleetlearn.v1)
 * holding every tensor of the architecture as little-endian float32.
 */
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  fsyncSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { basename, dirname, join } from 'node:path';

import {
  countElements,
  decodeModelWeights,
  decodeTensorValues,
  encodeFloat32Tensor,
  encodeModelWeights,
  ErrorCode,
  FleetError,
} from '../protocol/index.ts';
import { MODEL_NAME, TENSOR_SPECS, type WeightMap } from './architecture.ts';

/** Largest model version a ModelWeights message can store (uint32). */
const MAX_VERSION = 0xffffffff;

/** Weights with the model name and version stored beside them. */
export interface WeightsFileContents {
  modelName: string;
  version: number;
  weights: WeightMap;
}

/**
 * Reads a weights file written by writeWeightsFile and returns its tensors.
 *
 * @throws {FleetError} INVALID_MODEL when the bytes do not decode, the
 *   model name is not MODEL_NAME, or a tensor is missing, unknown,
 *   duplicated, of the wrong shape or encoding, or not finite.
 * @throws the file system error (for example ENOENT) when the file cannot
 *   be read.
 */
export function readWeightsFile(path: string): WeightMap {
  return readWeightsFileContents(path).weights;
}

/** Like readWeightsFile, and also returns the stored name and version. */
export function readWeightsFileContents(path: string): WeightsFileContents {
  const bytes = readFileSync(path);
  let message;
  try {
    message = decodeModelWeights(bytes);
  } catch (err) {
    throw invalidModel(
      `weights file ${path} does not decode as ModelWeights`,
      err,
    );
  }
  if (message.modelName !== MODEL_NAME) {
    throw invalidModel(
      `weights file ${path} is for model ${JSON.stringify(message.modelName)}, ` +
        `expected ${MODEL_NAME}`,
    );
  }

  const weights: WeightMap = new Map();
  const specs = new Map(TENSOR_SPECS.map((spec) => [spec.name, spec.shape]));
  for (const tensor of message.tensors) {
    const shape = specs.get(tensor.name);
    if (shape === undefined) {
      throw invalidModel(
        `weights file ${path} has unknown tensor ${JSON.stringify(tensor.name)}`,
      );
    }
    if (weights.has(tensor.name)) {
      throw invalidModel(
        `weights file ${path} has tensor ${tensor.name} twice`,
      );
    }
    if (!sameShape(tensor.shape, shape)) {
      throw invalidModel(
        `weights file ${path} has tensor ${tensor.name} of shape ` +
          `[${tensor.shape.join(', ')}], expected [${shape.join(', ')}]`,
      );
    }
    let values: Float32Array;
    try {
      // Copy, so that each tensor owns its buffer rather than a view of
      // the whole file.
      values = decodeTensorValues(tensor).slice();
    } catch (err) {
      throw invalidModel(
        `weights file ${path} has an unreadable tensor ${tensor.name}`,
        err,
      );
    }
    const bad = values.findIndex((value) => !Number.isFinite(value));
    if (bad >= 0) {
      throw invalidModel(
        `weights file ${path} has a non-finite value ${values[bad]} in ` +
          `tensor ${tensor.name} at index ${bad}`,
      );
    }
    weights.set(tensor.name, values);
  }

  const missing = TENSOR_SPECS.filter((spec) => !weights.has(spec.name));
  if (missing.length > 0) {
    throw invalidModel(
      `weights file ${path} is missing tensors ${missing.map((spec) => spec.name).join(', ')}`,
    );
  }
  return { modelName: message.modelName, version: message.version, weights };
}

/**
 * Writes every tensor of `weights` as a ModelWeights message. The bytes go
 * to a temporary file in the same directory, which is flushed to disk and
 * renamed over `path`, so readers see the old file or the new one, never a
 * partial one. The temporary file is removed when any step fails.
 *
 * @throws {TypeError} when `meta.modelName` is not a non-empty string.
 * @throws {RangeError} when `meta.version` is not an integer in 0..2^32-1.
 * @throws {FleetError} INVALID_MODEL when a tensor is missing, unknown, of
 *   the wrong size or not finite.
 * @throws the file system error when writing or renaming fails.
 */
export function writeWeightsFile(
  path: string,
  weights: WeightMap,
  meta: { modelName: string; version: number },
): void {
  checkMeta(meta);
  checkWeightMap(weights);
  const bytes = encodeModelWeights({
    modelName: meta.modelName,
    version: meta.version,
    tensors: TENSOR_SPECS.map((spec) =>
      encodeFloat32Tensor(spec.name, spec.shape, weights.get(spec.name)!),
    ),
  });
  writeFileAtomic(path, bytes);
}

/** Writes `bytes` to a sibling temporary file, fsyncs it and renames it. */
function writeFileAtomic(path: string, bytes: Uint8Array): void {
  const temporary = join(
    dirname(path),
    `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`,
  );
  try {
    const fd = openSync(temporary, 'wx');
    try {
      let written = 0;
      while (written < bytes.byteLength) {
        written += writeSync(fd, bytes, written);
      }
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(temporary, path);
  } catch (err) {
    rmSync(temporary, { force: true });
    throw err;
  }
}

function checkMeta(meta: { modelName: string; version: number }): void {
  if (typeof meta?.modelName !== 'string' || meta.modelName === '') {
    throw new TypeError(
      `modelName must be a non-empty string, got ${JSON.stringify(meta?.modelName)}`,
    );
  }
  if (
    !Number.isSafeInteger(meta.version) ||
    meta.version < 0 ||
    meta.version > MAX_VERSION
  ) {
    throw new RangeError(
      `version must be an integer in 0..${MAX_VERSION}, got ${meta.version}`,
    );
  }
}

function checkWeightMap(weights: WeightMap): void {
  const known = new Set(TENSOR_SPECS.map((spec) => spec.name));
  for (const name of weights.keys()) {
    if (!known.has(name)) {
      throw invalidModel(`weights have unknown tensor ${JSON.stringify(name)}`);
    }
  }
  for (const spec of TENSOR_SPECS) {
    const values = weights.get(spec.name);
    const expected = countElements(spec.shape);
    if (!(values instanceof Float32Array) || values.length !== expected) {
      throw invalidModel(
        `weights tensor ${spec.name} has ${values?.length ?? 'no'} values, ` +
          `expected a Float32Array of ${expected}`,
      );
    }
    const bad = values.findIndex((value) => !Number.isFinite(value));
    if (bad >= 0) {
      throw invalidModel(
        `weights tensor ${spec.name} has a non-finite value ${values[bad]} at index ${bad}`,
      );
    }
  }
}

function sameShape(
  actual: readonly number[],
  expected: readonly number[],
): boolean {
  return (
    actual.length === expected.length &&
    actual.every((dim, i) => dim === expected[i])
  );
}

function invalidModel(message: string, cause?: unknown): FleetError {
  return new FleetError(
    ErrorCode.InvalidModel,
    message,
    cause === undefined ? undefined : { cause },
  );
}
