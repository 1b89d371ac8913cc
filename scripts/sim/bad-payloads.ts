/**
 * Bad update payloads built from a genuine one, as a misbehaving sender on
 * a vehicle's update topic would publish them. Pure functions, seeded.
 */
import { createRandom } from '../../models/index.ts';
import {
  ErrorCode,
  TensorEncoding,
  decodeModelUpdate,
  encodeFloat32Tensor,
  encodeModelUpdate,
  type ModelUpdate,
  type WireTensor,
} from '../../protocol/index.ts';
import { decodeDeltaValues } from '../../protocol/compression/index.ts';
import type { PayloadFaultKind } from './faults.ts';

/** Leading bytes of an update that `corrupt` flips: ids, names, shapes. */
const CORRUPT_REGION_BYTES = 256;
/** Attempts to find flips that the protobuf decoder rejects. */
const CORRUPT_ATTEMPTS = 64;
/** A first byte with wire type 7, which no protobuf decoder accepts. */
const INVALID_TAG_BYTE = 0x07;

/** A bad payload and the rejection the aggregator is expected to send. */
export interface BadPayload {
  kind: PayloadFaultKind;
  payload: Uint8Array;
  /** Update id the aggregator decodes; undefined when decoding fails. */
  updateId: string | undefined;
  /** Reason code of the rejection when it arrives in the open round. */
  expectedCode: ErrorCode;
}

/**
 * Builds a `kind` payload from the encoded genuine update `genuine`. Each
 * payload that still decodes carries a fresh update id derived from
 * `seed`, so it never shares an id with a genuine update:
 * - truncated: the update cut at a seeded length (MALFORMED_PAYLOAD);
 * - corrupt: 1-3 seeded bytes flipped among the first 256 (MALFORMED_PAYLOAD);
 * - nan: one delta value set to NaN (NON_FINITE_VALUE);
 * - wrong-shape: a delta tensor with another shape (WRONG_SHAPE).
 *
 * @throws {FleetError} MALFORMED_PAYLOAD when `genuine` does not decode.
 */
export function buildBadPayload(
  kind: PayloadFaultKind,
  genuine: Uint8Array,
  seed: number,
): BadPayload {
  const random = createRandom(seed);
  const update = decodeModelUpdate(genuine);
  const updateId = `injected-${kind}-${update.updateId.slice(0, 8)}-${seed}`;
  const fresh: ModelUpdate = { ...update, updateId };
  switch (kind) {
    case 'truncated':
      return truncate(encodeModelUpdate(fresh), random);
    case 'corrupt':
      return corrupt(encodeModelUpdate(fresh), random);
    case 'nan':
      return {
        kind,
        payload: encodeModelUpdate(withNaN(fresh, random)),
        updateId,
        expectedCode: float32Code(update, ErrorCode.NonFiniteValue),
      };
    case 'wrong-shape':
      return {
        kind,
        payload: encodeModelUpdate(withWrongShape(fresh)),
        updateId,
        expectedCode: float32Code(update, ErrorCode.WrongShape),
      };
  }
}

/**
 * Cuts the payload at a seeded length. The decoder requires the last
 * field, so every proper prefix fails to decode.
 */
function truncate(encoded: Uint8Array, random: () => number): BadPayload {
  const length = 1 + Math.floor(random() * (encoded.length - 1));
  return {
    kind: 'truncated',
    payload: encoded.slice(0, length),
    updateId: undefined,
    expectedCode: ErrorCode.MalformedPayload,
  };
}

/**
 * Flips bytes in the leading region until the decoder rejects the result.
 * NOTE: flips inside the float values decode into another valid update,
 * which no receiver can tell from a genuine one, because the protocol
 * carries no checksum or signature. Such variants are skipped here.
 */
function corrupt(encoded: Uint8Array, random: () => number): BadPayload {
  const region = Math.min(CORRUPT_REGION_BYTES, encoded.length);
  for (let attempt = 0; attempt < CORRUPT_ATTEMPTS; attempt++) {
    const payload = encoded.slice();
    const flips = 1 + Math.floor(random() * 3);
    for (let i = 0; i < flips; i++) {
      const position = Math.floor(random() * region);
      payload[position] ^= 1 + Math.floor(random() * 255);
    }
    if (!decodes(payload)) {
      return {
        kind: 'corrupt',
        payload,
        updateId: undefined,
        expectedCode: ErrorCode.MalformedPayload,
      };
    }
  }
  const payload = encoded.slice();
  payload[0] = INVALID_TAG_BYTE;
  return {
    kind: 'corrupt',
    payload,
    updateId: undefined,
    expectedCode: ErrorCode.MalformedPayload,
  };
}

function decodes(payload: Uint8Array): boolean {
  try {
    decodeModelUpdate(payload);
    return true;
  } catch {
    return false;
  }
}

/**
 * Returns `code`, or UNSUPPORTED_ENCODING when the genuine update was
 * compressed: the bad tensor goes out as float32, and the encoding check
 * comes first.
 */
function float32Code(update: ModelUpdate, code: ErrorCode): ErrorCode {
  const encoding = update.deltas[0]?.encoding;
  return encoding === TensorEncoding.Float32
    ? code
    : ErrorCode.UnsupportedEncoding;
}

/** Sets one seeded value of the first delta tensor to NaN. */
function withNaN(update: ModelUpdate, random: () => number): ModelUpdate {
  const [first, ...rest] = update.deltas;
  const values = decodeDeltaValues(first).slice();
  values[Math.floor(random() * values.length)] = Number.NaN;
  const poisoned = encodeFloat32Tensor(first.name, first.shape, values);
  return { ...update, deltas: [poisoned, ...rest] };
}

/**
 * Gives the first delta tensor another shape: a matrix is transposed in
 * shape only, and a vector loses its last value.
 */
function withWrongShape(update: ModelUpdate): ModelUpdate {
  const [first, ...rest] = update.deltas;
  return { ...update, deltas: [reshape(first), ...rest] };
}

function reshape(tensor: WireTensor): WireTensor {
  const values = decodeDeltaValues(tensor);
  const [rows, columns] = tensor.shape;
  if (tensor.shape.length === 2 && rows !== columns) {
    return encodeFloat32Tensor(tensor.name, [columns, rows], values.slice());
  }
  const shorter = values.slice(0, values.length - 1);
  return encodeFloat32Tensor(tensor.name, [shorter.length], shorter);
}
