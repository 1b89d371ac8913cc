/**
 * Release messages of one model version: the retained notice and the
 * chunks that carry its ONNX file. Pure functions, shared by the
 * aggregator and by tests that play the aggregator.
 */
import { sha256Hex } from '../models/index.ts';
import {
  ErrorCode,
  FleetError,
  encodeModelRelease,
  encodeReleaseChunk,
  releaseChunkOverheadBytes,
  type ModelRelease,
} from '../protocol/index.ts';
import type { ModelManifest } from './model-store.ts';

/** Manifest fields a release notice repeats; digest and size come from the file. */
export type ReleaseInfo = Pick<
  ModelManifest,
  | 'modelName'
  | 'version'
  | 'parentVersion'
  | 'round'
  | 'createdAtMs'
  | 'numVehicles'
  | 'numExamples'
  | 'testAccuracy'
>;

/** Encoded messages of one release, ready to publish. */
export interface EncodedRelease {
  /** The decoded form of `notice`. */
  release: ModelRelease;
  /** Encoded ModelRelease, for the retained release topic. */
  notice: Uint8Array;
  /** Encoded ReleaseChunk messages, by chunk index. */
  chunks: Uint8Array[];
}

/**
 * Data bytes per chunk, so that each encoded ReleaseChunk fits in
 * `maxMessageBytes`.
 *
 * @throws {FleetError} INVALID_CONFIG when not even one data byte fits.
 */
export function chunkSizeFor(
  maxMessageBytes: number,
  modelName: string,
): number {
  const overhead = releaseChunkOverheadBytes(modelName);
  if (maxMessageBytes <= overhead) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `maxMessageBytes ${maxMessageBytes} leaves no room for release chunk ` +
        `data: a chunk of model ${modelName} needs ${overhead} bytes around ` +
        'its data',
    );
  }
  return maxMessageBytes - overhead;
}

function noticeOf(
  info: ReleaseInfo,
  onnx: Uint8Array,
  chunkSizeBytes: number,
  chunkSha256: string[],
): ModelRelease {
  return {
    modelName: info.modelName,
    version: info.version,
    parentVersion: info.parentVersion,
    round: info.round,
    sha256: sha256Hex(onnx),
    sizeBytes: onnx.byteLength,
    createdAtMs: info.createdAtMs,
    testAccuracy: info.testAccuracy ?? 0,
    numVehicles: info.numVehicles,
    numExamples: info.numExamples,
    chunkSizeBytes,
    chunkCount: chunkSha256.length,
    chunkSha256,
    releaseSequence: 0,
  };
}

/** Splits `onnx` into views of `chunkSizeBytes`; the last may be shorter. */
export function splitIntoChunks(
  onnx: Uint8Array,
  chunkSizeBytes: number,
): Uint8Array[] {
  const chunks: Uint8Array[] = [];
  for (let start = 0; start < onnx.byteLength; start += chunkSizeBytes) {
    chunks.push(onnx.subarray(start, start + chunkSizeBytes));
  }
  return chunks;
}

/**
 * Encodes the notice and chunks of a release whose chunks fill
 * `maxMessageBytes`.
 *
 * @throws {FleetError} PAYLOAD_TOO_LARGE when the notice, which lists one
 *   digest per chunk, exceeds `maxMessageBytes`; INVALID_CONFIG when no
 *   chunk data fits; RangeError for an empty file.
 */
export function encodeRelease(
  info: ReleaseInfo,
  onnx: Uint8Array,
  maxMessageBytes: number,
): EncodedRelease {
  if (onnx.byteLength === 0) {
    throw new RangeError(`model version ${info.version} has an empty file`);
  }
  const chunkSizeBytes = chunkSizeFor(maxMessageBytes, info.modelName);
  const parts = splitIntoChunks(onnx, chunkSizeBytes);
  const release = noticeOf(info, onnx, chunkSizeBytes, parts.map(sha256Hex));
  const notice = encodeModelRelease(release, maxMessageBytes);
  const chunks = parts.map((data, index) =>
    encodeReleaseChunk(
      { modelName: info.modelName, version: info.version, index, data },
      maxMessageBytes,
    ),
  );
  return { release, notice, chunks };
}

/**
 * Maximum bytes that signing adds to a notice. The SignedRelease fields
 * around the manifest take two-byte tags for fields 16-18, a length of
 * up to 5 bytes, and the 64-byte signature and 16-digit key id with
 * their one-byte lengths. The release sequence in the manifest takes a
 * tag and a varint of at most 8 bytes below 2^53.
 */
export const SIGNED_NOTICE_OVERHEAD_BYTES = 2 + 5 + 2 + 1 + 64 + 2 + 1 + 16 + 9;

/**
 * Size of the notice of a `sizeBytes` file at `maxMessageBytes`, plus
 * `extraBytes` (the signature's share when notices are signed).
 */
function noticeBytesAt(
  info: ReleaseInfo,
  sizeBytes: number,
  maxMessageBytes: number,
  extraBytes: number,
): number {
  const chunkSizeBytes =
    maxMessageBytes - releaseChunkOverheadBytes(info.modelName);
  const count = Math.ceil(sizeBytes / chunkSizeBytes);
  // Digests are fixed-width hex, so placeholders give the exact size.
  const release = noticeOf(
    info,
    new Uint8Array(0),
    chunkSizeBytes,
    new Array<string>(count).fill('0'.repeat(64)),
  );
  release.sizeBytes = sizeBytes;
  const bytes = encodeModelRelease(release, Number.MAX_SAFE_INTEGER);
  return bytes.byteLength + extraBytes;
}

/** Smallest maxMessageBytes whose release of a `sizeBytes` file fits. */
function minimumMessageBytes(
  info: ReleaseInfo,
  sizeBytes: number,
  extraBytes: number,
): number {
  const overhead = releaseChunkOverheadBytes(info.modelName);
  const noticeBytes = (max: number): number =>
    noticeBytesAt(info, sizeBytes, max, extraBytes);
  const fits = (max: number): boolean => noticeBytes(max) <= max;
  // At `high` the file is one chunk and its notice fits, so `high` works.
  let low = overhead + 1;
  let high = sizeBytes + overhead + noticeBytes(sizeBytes + overhead);
  while (low < high) {
    const middle = Math.floor((low + high) / 2);
    if (fits(middle)) high = middle;
    else low = middle + 1;
  }
  return low;
}

/**
 * Checks that `maxMessageBytes` can carry the release of `onnx`. The
 * aggregator calls it at start, because every version of one
 * architecture has about the same file size. Pass
 * SIGNED_NOTICE_OVERHEAD_BYTES as `extraNoticeBytes` when notices are
 * signed.
 *
 * @throws {FleetError} INVALID_CONFIG naming maxMessageBytes, the chunk
 *   count, the notice size and the smallest value that works.
 */
export function checkReleaseFits(
  info: ReleaseInfo,
  onnx: Uint8Array,
  maxMessageBytes: number,
  extraNoticeBytes = 0,
): void {
  const chunkSizeBytes = chunkSizeFor(maxMessageBytes, info.modelName);
  const noticeBytes = noticeBytesAt(
    info,
    onnx.byteLength,
    maxMessageBytes,
    extraNoticeBytes,
  );
  if (noticeBytes <= maxMessageBytes) return;
  const count = Math.ceil(onnx.byteLength / chunkSizeBytes);
  const minimum = minimumMessageBytes(info, onnx.byteLength, extraNoticeBytes);
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `maxMessageBytes ${maxMessageBytes} is too small for releases of ` +
      `model ${info.modelName}: its ${onnx.byteLength}-byte file needs ` +
      `${count} chunks of ${chunkSizeBytes} bytes, and the notice listing ` +
      `their digests takes ${noticeBytes} bytes; use at least ${minimum}`,
  );
}
