/**
 * Checks of the delta tensors of an update, or of a depot's partial,
 * against the round's trainable tensors: names, encoding, shape, finite
 * values and the |value| bound.
 */
import {
  ErrorCode,
  countElements,
  isFleetError,
  type WireTensor,
} from '../protocol/index.ts';
import {
  CompressionKind,
  NO_COMPRESSION,
  decodeDeltaValues,
  describeCompression,
  describeEncoding,
  encodingOf,
  topkCount,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import type { RejectedUpdate, RoundContext } from './validate.ts';

function reject(code: ErrorCode, reason: string): RejectedUpdate {
  return { accepted: false, code, reason };
}

/** Rules the delta tensors of an update or a partial must follow. */
export type TensorRules = Pick<
  RoundContext,
  'trainableShapes' | 'maxAbsDeltaValue' | 'updateCompression'
> & {
  /** Round the tensors were sent for, named in encoding errors. */
  round: number;
};

/**
 * Decodes delta tensors and returns their values by name, or the first
 * problem found. The problems are tensor names other than the trainable
 * ones, an encoding other than `updateCompression`'s, a wrong shape, a
 * non-finite value, and a |value| above maxAbsDeltaValue. `subject`
 * opens the tensor-name reason, for example "update u-17".
 */
export function decodeDeltaTensors(
  tensors: readonly WireTensor[],
  subject: string,
  rules: TensorRules,
): WeightMap | RejectedUpdate {
  const shapes = rules.trainableShapes;
  const names = tensors.map((tensor) => tensor.name);
  const expected = [...shapes.keys()];
  const isSameSet =
    names.length === expected.length &&
    new Set(names).size === names.length &&
    names.every((name) => shapes.has(name));
  if (!isSameSet) {
    return reject(
      ErrorCode.WrongTensors,
      `${subject} carries tensors [${names.join(', ')}], ` +
        `expected exactly [${expected.join(', ')}]`,
    );
  }

  const deltas: WeightMap = new Map();
  const compression = rules.updateCompression ?? NO_COMPRESSION;
  for (const tensor of tensors) {
    const problem = checkEncoding(tensor, compression, rules.round);
    if (problem !== undefined) return problem;
    const values = decodeDelta(
      tensor,
      shapes.get(tensor.name)!,
      rules.maxAbsDeltaValue,
    );
    if (!(values instanceof Float32Array)) return values;
    deltas.set(tensor.name, values);
  }
  return deltas;
}

/**
 * Rejects a tensor whose encoding is not the one the round announced, and
 * a top-k tensor with more values than the round's density allows. Both
 * would let a vehicle send more bytes than the round budgets for.
 */
function checkEncoding(
  tensor: WireTensor,
  compression: UpdateCompression,
  round: number,
): RejectedUpdate | undefined {
  const expected = encodingOf(compression);
  if (tensor.encoding !== expected) {
    return reject(
      ErrorCode.UnsupportedEncoding,
      `tensor ${tensor.name} has encoding ` +
        `${describeEncoding(tensor.encoding)}, but round ${round} expects ` +
        `encoding ${describeEncoding(expected)} for ` +
        `${describeCompression(compression)} compression`,
    );
  }
  if (compression.kind !== CompressionKind.TopK) return undefined;
  const maxCount = topkCount(
    countElements(tensor.shape),
    compression.topkDensity,
  );
  if (tensor.indices.length <= maxCount) return undefined;
  return reject(
    ErrorCode.UnsupportedEncoding,
    `top-k tensor ${tensor.name} carries ${tensor.indices.length} values, ` +
      `but round ${round} allows at most ${maxCount} for its ` +
      `${countElements(tensor.shape)} elements ` +
      `(${describeCompression(compression)})`,
  );
}

function decodeDelta(
  tensor: WireTensor,
  shape: readonly number[],
  maxAbsValue: number,
): Float32Array | RejectedUpdate {
  const isSameShape =
    tensor.shape.length === shape.length &&
    tensor.shape.every((dim, i) => dim === shape[i]);
  if (!isSameShape) {
    return reject(
      ErrorCode.WrongShape,
      `tensor ${tensor.name} has shape [${tensor.shape.join(', ')}], ` +
        `expected [${shape.join(', ')}] (${countElements(shape)} values)`,
    );
  }

  let values: Float32Array;
  try {
    values = decodeDeltaValues(tensor);
  } catch (err) {
    if (!isFleetError(err)) throw err;
    return reject(err.code, err.message);
  }
  const bad = values.findIndex((value) => !Number.isFinite(value));
  if (bad >= 0) {
    return reject(
      ErrorCode.NonFiniteValue,
      `tensor ${tensor.name} has value ${values[bad]} at index ${bad}; ` +
        'expected finite numbers',
    );
  }
  // A bound keeps the float sums of FedAvg far from overflow, so one
  // vehicle cannot turn the merged model into Inf or NaN.
  const large = values.findIndex((value) => Math.abs(value) > maxAbsValue);
  if (large >= 0) {
    return reject(
      ErrorCode.ValueOutOfRange,
      `tensor ${tensor.name} has value ${values[large]} at index ${large}; ` +
        `expected |value| <= ${maxAbsValue}`,
    );
  }
  return values;
}
