import type protobuf from 'protobufjs';
import { ErrorCode, FleetError } from './errors.ts';
import type {
  ModelRelease,
  ModelUpdate,
  ModelWeights,
  ReleaseChunk,
  RoundTask,
  SignedEnvelope,
  UpdateAck,
  VehicleReport,
  VehicleStatus,
} from './messages.ts';
import { schema } from './schema.ts';

/**
 * Converts a 64-bit protobuf field to a JS number. protobufjs hands out
 * Long objects (or decimal strings under toObject's `longs: String`);
 * values above Number.MAX_SAFE_INTEGER are rejected rather than rounded.
 */
export function toSafeInteger(field: string, value: unknown): number {
  const parsed =
    typeof value === 'number'
      ? value
      : typeof value === 'string'
        ? Number(value)
        : value !== null && typeof value === 'object' && 'toString' in value
          ? Number(String(value))
          : Number.NaN;
  if (!Number.isSafeInteger(parsed) || parsed < 0) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `field ${field} is ${String(value)}, expected an integer between 0 ` +
        `and ${Number.MAX_SAFE_INTEGER}`,
    );
  }
  return parsed;
}

const TO_OBJECT: protobuf.IConversionOptions = {
  longs: String,
  enums: Number,
  defaults: true,
  arrays: true,
};

export function encodeWith(
  type: protobuf.Type,
  message: object,
  maxBytes: number,
): Uint8Array {
  const problem = type.verify(message);
  if (problem !== null) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `cannot encode ${type.name}: ${problem}`,
    );
  }
  const bytes = type.encode(type.fromObject(message)).finish();
  if (bytes.length > maxBytes) {
    throw new FleetError(
      ErrorCode.PayloadTooLarge,
      `encoded ${type.name} is ${bytes.length} bytes, above the maximum ` +
        `of ${maxBytes} bytes`,
    );
  }
  return bytes;
}

export function decodeWith(
  type: protobuf.Type,
  bytes: Uint8Array,
): Record<string, unknown> {
  if (!(bytes instanceof Uint8Array)) {
    throw new TypeError(`expected a Uint8Array, received ${typeof bytes}`);
  }
  try {
    return type.toObject(type.decode(bytes), TO_OBJECT);
  } catch (err) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `cannot decode ${type.name} from ${bytes.length} bytes: ` +
        (err as Error).message,
      { cause: err },
    );
  }
}

export function requireText(
  type: string,
  object: Record<string, unknown>,
  fields: string[],
): void {
  for (const field of fields) {
    const value = object[field];
    if (typeof value !== 'string' || value.length === 0) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `${type} has no ${field}; expected a non-empty string`,
      );
    }
  }
}

/** Default ceiling on one encoded message: 64 MiB. */
export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/** Encodes a ModelUpdate; throws PAYLOAD_TOO_LARGE above `maxBytes`. */
export function encodeModelUpdate(
  update: ModelUpdate,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.ModelUpdate, update, maxBytes);
}

/** Decodes a ModelUpdate; throws MALFORMED_PAYLOAD on bad bytes. */
export function decodeModelUpdate(bytes: Uint8Array): ModelUpdate {
  const object = decodeWith(schema.ModelUpdate, bytes);
  requireText('ModelUpdate', object, ['updateId', 'vehicleId', 'modelName']);
  object.numExamples = toSafeInteger('numExamples', object.numExamples);
  object.createdAtMs = toSafeInteger('createdAtMs', object.createdAtMs);
  // protobufjs writes fields in field-number order and created_at_ms is the
  // last one, so requiring it catches a payload cut at a field boundary,
  // which would otherwise decode as an update with fields missing.
  if (object.createdAtMs === 0 || object.metrics === null) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      'ModelUpdate has no createdAtMs or metrics; the payload is truncated ' +
        'or was built without them',
    );
  }
  return object as unknown as ModelUpdate;
}

/** Encodes a RoundTask. */
export function encodeRoundTask(
  task: RoundTask,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.RoundTask, task, maxBytes);
}

/** Decodes a RoundTask; throws MALFORMED_PAYLOAD on bad bytes. */
export function decodeRoundTask(bytes: Uint8Array): RoundTask {
  const object = decodeWith(schema.RoundTask, bytes);
  requireText('RoundTask', object, ['fleetId', 'modelName']);
  if (object.training === null || object.training === undefined) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      'RoundTask has no training config',
    );
  }
  object.openedAtMs = toSafeInteger('openedAtMs', object.openedAtMs);
  object.deadlineMs = toSafeInteger('deadlineMs', object.deadlineMs);
  const secure = object.secureAggregation as Record<string, unknown> | null;
  if (secure !== null && secure !== undefined) {
    secure.exampleCap = toSafeInteger(
      'secureAggregation.exampleCap',
      secure.exampleCap,
    );
  }
  return object as unknown as RoundTask;
}

/** Encodes an UpdateAck. */
export function encodeUpdateAck(
  ack: UpdateAck,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.UpdateAck, ack, maxBytes);
}

/** Decodes an UpdateAck; throws MALFORMED_PAYLOAD on bad bytes. */
export function decodeUpdateAck(bytes: Uint8Array): UpdateAck {
  const object = decodeWith(schema.UpdateAck, bytes);
  requireText('UpdateAck', object, ['updateId']);
  return object as unknown as UpdateAck;
}

/** Encodes a release notice; throws PAYLOAD_TOO_LARGE above `maxBytes`. */
export function encodeModelRelease(
  release: ModelRelease,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.ModelRelease, release, maxBytes);
}

const HEX_SHA256 = /^[0-9a-f]{64}$/;

/**
 * Checks that a notice's chunk fields describe its file: at least one
 * byte, `chunkCount` = ceil(sizeBytes / chunkSizeBytes), and one
 * lower-case hex SHA-256 per chunk.
 */
function checkChunkPlan(release: ModelRelease): void {
  const { version, sizeBytes, chunkSizeBytes, chunkCount } = release;
  const malformed = (text: string): never => {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `ModelRelease version ${version} ${text}`,
    );
  };
  if (!HEX_SHA256.test(release.sha256)) {
    malformed(`has sha256 "${release.sha256}", expected 64 hex digits`);
  }
  if (sizeBytes < 1 || chunkSizeBytes < 1) {
    malformed(
      `has sizeBytes ${sizeBytes} and chunkSizeBytes ${chunkSizeBytes}, ` +
        'expected both at least 1',
    );
  }
  const expectedCount = Math.ceil(sizeBytes / chunkSizeBytes);
  if (chunkCount !== expectedCount) {
    malformed(
      `has chunkCount ${chunkCount}, but ${sizeBytes} bytes in chunks of ` +
        `${chunkSizeBytes} bytes make ${expectedCount}`,
    );
  }
  if (release.chunkSha256.length !== chunkCount) {
    malformed(
      `lists ${release.chunkSha256.length} chunk digests for ` +
        `${chunkCount} chunks`,
    );
  }
  const bad = release.chunkSha256.findIndex((hex) => !HEX_SHA256.test(hex));
  if (bad >= 0) {
    malformed(
      `has chunk ${bad} digest "${release.chunkSha256[bad]}", ` +
        'expected 64 lower-case hex digits',
    );
  }
}

/**
 * Decodes a release notice and checks its chunk fields.
 *
 * @throws {FleetError} MALFORMED_PAYLOAD on bad bytes, a missing name or
 *   digest, or chunk fields that do not describe the file.
 */
export function decodeModelRelease(bytes: Uint8Array): ModelRelease {
  const object = decodeWith(schema.ModelRelease, bytes);
  requireText('ModelRelease', object, ['modelName', 'sha256']);
  object.sizeBytes = toSafeInteger('sizeBytes', object.sizeBytes);
  object.createdAtMs = toSafeInteger('createdAtMs', object.createdAtMs);
  object.numExamples = toSafeInteger('numExamples', object.numExamples);
  object.releaseSequence = toSafeInteger(
    'releaseSequence',
    object.releaseSequence,
  );
  // Absent rather than null, so a fleet-wide notice decodes as before.
  if (object.candidate === null) delete object.candidate;
  const release = object as unknown as ModelRelease;
  checkChunkPlan(release);
  if (release.candidate !== undefined) checkCandidate(release);
  return release;
}

/** Checks the cohort share and state of a candidate notice. */
function checkCandidate(release: ModelRelease): void {
  const candidate = release.candidate!;
  const basisPoints = candidate.cohort?.basisPoints ?? -1;
  if (basisPoints < 0 || basisPoints > 10_000) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `candidate notice of version ${release.version} has cohort share ` +
        `${basisPoints} basis points, expected 0 to 10000`,
    );
  }
  if (candidate.state < 1 || candidate.state > 3) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `candidate notice of version ${release.version} has state ` +
        `${candidate.state}, expected 1 (active), 2 (withdrawn) or 3 (promoted)`,
    );
  }
}

/**
 * Maximum number of bytes a ReleaseChunk adds around its data: four
 * one-byte field tags, the model name with its length prefix, and
 * version, index and data length as varints of at most 5 bytes each.
 */
export function releaseChunkOverheadBytes(modelName: string): number {
  const nameBytes = Buffer.byteLength(modelName, 'utf8');
  return 4 + 5 + nameBytes + 5 + 5 + 5;
}

/** Encodes a ReleaseChunk; throws PAYLOAD_TOO_LARGE above `maxBytes`. */
export function encodeReleaseChunk(
  chunk: ReleaseChunk,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.ReleaseChunk, chunk, maxBytes);
}

/**
 * Decodes a ReleaseChunk.
 *
 * @throws {FleetError} MALFORMED_PAYLOAD on bad bytes, a missing model
 *   name or empty data.
 */
export function decodeReleaseChunk(bytes: Uint8Array): ReleaseChunk {
  const object = decodeWith(schema.ReleaseChunk, bytes);
  requireText('ReleaseChunk', object, ['modelName']);
  const data = object.data as Uint8Array;
  if (data.length === 0) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `ReleaseChunk ${String(object.index)} of version ` +
        `${String(object.version)} has no data`,
    );
  }
  return object as unknown as ReleaseChunk;
}

/** Encodes a VehicleStatus. */
export function encodeVehicleStatus(
  status: VehicleStatus,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.VehicleStatus, status, maxBytes);
}

/** Decodes a VehicleStatus; throws MALFORMED_PAYLOAD on bad bytes. */
export function decodeVehicleStatus(bytes: Uint8Array): VehicleStatus {
  const object = decodeWith(schema.VehicleStatus, bytes);
  requireText('VehicleStatus', object, ['vehicleId']);
  object.numExamples = toSafeInteger('numExamples', object.numExamples);
  object.updatedAtMs = toSafeInteger('updatedAtMs', object.updatedAtMs);
  object.connectionId = toSafeInteger('connectionId', object.connectionId);
  return object as unknown as VehicleStatus;
}

/** Encodes a VehicleReport. */
export function encodeVehicleReport(
  report: VehicleReport,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeWith(schema.VehicleReport, report, maxBytes);
}

const REPORT_COUNTS = [
  'inferenceCount',
  'errorCount',
  'comparedCount',
  'agreedCount',
] as const;

/**
 * Decodes a VehicleReport and turns its 64-bit counts into numbers.
 *
 * @throws {FleetError} MALFORMED_PAYLOAD on bad bytes, a missing vehicle
 *   id, or a version whose correct or agreed count exceeds its total.
 */
export function decodeVehicleReport(bytes: Uint8Array): VehicleReport {
  const object = decodeWith(schema.VehicleReport, bytes);
  requireText('VehicleReport', object, ['vehicleId']);
  object.createdAtMs = toSafeInteger('createdAtMs', object.createdAtMs);
  const report = object as unknown as VehicleReport;
  for (const entry of report.versions) {
    const fields = entry as unknown as Record<string, unknown>;
    for (const name of REPORT_COUNTS) {
      fields[name] = toSafeInteger(`versions.${name}`, fields[name]);
    }
    if (
      entry.correctCount > entry.labelledCount ||
      entry.agreedCount > entry.comparedCount
    ) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `VehicleReport of ${report.vehicleId} has version ${entry.version} ` +
          `with ${entry.correctCount} correct of ${entry.labelledCount} ` +
          `labelled and ${entry.agreedCount} agreed of ` +
          `${entry.comparedCount} compared; a part exceeds its total`,
      );
    }
  }
  return report;
}

/** Encodes a ModelWeights file. */
export function encodeModelWeights(weights: ModelWeights): Uint8Array {
  return encodeWith(schema.ModelWeights, weights, Number.MAX_SAFE_INTEGER);
}

/** Decodes a ModelWeights file; throws MALFORMED_PAYLOAD on bad bytes. */
export function decodeModelWeights(bytes: Uint8Array): ModelWeights {
  const object = decodeWith(schema.ModelWeights, bytes);
  requireText('ModelWeights', object, ['modelName']);
  return object as unknown as ModelWeights;
}

/** Length of an Ed25519 signature in bytes. */
export const ED25519_SIGNATURE_BYTES = 64;

function encodeEnvelope(
  type: protobuf.Type,
  field: 'manifest' | 'update',
  envelope: SignedEnvelope,
  maxBytes: number,
): Uint8Array {
  const message = {
    [field]: envelope.signedBytes,
    signature: envelope.signature,
    keyId: envelope.keyId,
  };
  return encodeWith(type, message, maxBytes);
}

/**
 * Decodes an envelope, or returns undefined when the payload carries none
 * of its fields, as a bare inner message does: the envelope's field
 * numbers are reserved in the inner message.
 */
function decodeEnvelope(
  type: protobuf.Type,
  field: 'manifest' | 'update',
  bytes: Uint8Array,
): SignedEnvelope | undefined {
  const object = decodeWith(type, bytes);
  const signedBytes = object[field] as Uint8Array;
  const signature = object.signature as Uint8Array;
  const keyId = object.keyId as string;
  const isEmpty =
    signedBytes.length === 0 && signature.length === 0 && keyId === '';
  if (isEmpty) return undefined;
  if (
    signedBytes.length === 0 ||
    keyId.length === 0 ||
    signature.length !== ED25519_SIGNATURE_BYTES
  ) {
    throw new FleetError(
      ErrorCode.MalformedPayload,
      `${type.name} has a ${signedBytes.length}-byte ${field}, a ` +
        `${signature.length}-byte signature and key id "${keyId}"; ` +
        `expected a non-empty ${field}, a ${ED25519_SIGNATURE_BYTES}-byte ` +
        'signature and a key id',
    );
  }
  return { signedBytes, signature, keyId };
}

/** Encodes a SignedRelease; throws PAYLOAD_TOO_LARGE above `maxBytes`. */
export function encodeSignedRelease(
  envelope: SignedEnvelope,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeEnvelope(schema.SignedRelease, 'manifest', envelope, maxBytes);
}

/**
 * Decodes the SignedRelease on the release topic. Returns undefined for a
 * bare ModelRelease, which carries none of the envelope's fields. The
 * signature is not checked here.
 *
 * @throws {FleetError} MALFORMED_PAYLOAD on bad bytes or an envelope with
 *   a field missing.
 */
export function decodeSignedRelease(
  bytes: Uint8Array,
): SignedEnvelope | undefined {
  return decodeEnvelope(schema.SignedRelease, 'manifest', bytes);
}

/** Encodes a SignedUpdate; throws PAYLOAD_TOO_LARGE above `maxBytes`. */
export function encodeSignedUpdate(
  envelope: SignedEnvelope,
  maxBytes = DEFAULT_MAX_MESSAGE_BYTES,
): Uint8Array {
  return encodeEnvelope(schema.SignedUpdate, 'update', envelope, maxBytes);
}

/**
 * Decodes the SignedUpdate on an update topic. Returns undefined for a
 * bare ModelUpdate. The signature is not checked here.
 *
 * @throws {FleetError} MALFORMED_PAYLOAD on bad bytes or an envelope with
 *   a field missing.
 */
export function decodeSignedUpdate(
  bytes: Uint8Array,
): SignedEnvelope | undefined {
  return decodeEnvelope(schema.SignedUpdate, 'update', bytes);
}

/**
 * Decodes the ModelUpdate of an update payload, bare or signed, without
 * checking a signature: for the vehicle's own outbox and for tools that
 * inspect traffic.
 *
 * @throws {FleetError} MALFORMED_PAYLOAD on bad bytes.
 */
export function decodeUpdatePayload(bytes: Uint8Array): ModelUpdate {
  const envelope = decodeSignedUpdate(bytes);
  return decodeModelUpdate(envelope?.signedBytes ?? bytes);
}
