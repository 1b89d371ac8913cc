/**
 * The UpdateCompression of a round: which encoding vehicles use for their
 * deltas, with its command-line names, checks and defaults.
 */
import { ErrorCode, FleetError } from '../errors.ts';
import type { RoundTask } from '../messages.ts';
import { TensorEncoding } from '../schema.ts';

/** Numeric values of the UpdateCompression.Kind enum. */
export const CompressionKind = {
  Unspecified: 0,
  Float32: 1,
  Float16: 2,
  Int8: 3,
  Int8Channel: 4,
  TopK: 5,
} as const;

/** A CompressionKind value. */
export type CompressionKind =
  (typeof CompressionKind)[keyof typeof CompressionKind];

/** UpdateCompression as protobufjs decodes it, camelCase. */
export interface UpdateCompression {
  /** A CompressionKind value; Unspecified means float32. */
  kind: number;
  /** Share of each tensor's elements sent by TopK, in (0, 1]. */
  topkDensity: number;
}

/** A RoundTask with the compression field that decoding fills in. */
export type CompressedRoundTask = RoundTask & {
  /** null or absent when the aggregator sent none (float32). */
  compression?: UpdateCompression | null;
};

/** Command-line names of the kinds, in CompressionKind order. */
export const COMPRESSION_NAMES = [
  'float32',
  'float16',
  'int8',
  'int8-channel',
  'topk',
] as const;

/** One of COMPRESSION_NAMES. */
export type CompressionName = (typeof COMPRESSION_NAMES)[number];

/** Density of --topk-density when not given: 1% of each tensor. */
export const DEFAULT_TOPK_DENSITY = 0.01;

/** Plain float32 deltas, the behaviour before compression existed. */
export const NO_COMPRESSION: UpdateCompression = {
  kind: CompressionKind.Float32,
  topkDensity: 0,
};

const KIND_BY_NAME: Record<CompressionName, CompressionKind> = {
  float32: CompressionKind.Float32,
  float16: CompressionKind.Float16,
  int8: CompressionKind.Int8,
  'int8-channel': CompressionKind.Int8Channel,
  topk: CompressionKind.TopK,
};

/**
 * Returns the command-line name of `kind` (float32 for Unspecified), or
 * `kind <n>` for a value this build does not know.
 */
export function compressionNameOf(kind: number): string {
  if (kind === CompressionKind.Unspecified) return 'float32';
  const entry = Object.entries(KIND_BY_NAME).find(([, k]) => k === kind);
  return entry === undefined ? `kind ${kind}` : entry[0];
}

/**
 * Builds the UpdateCompression of a command-line name. `topkDensity` is
 * used by 'topk' only and defaults to DEFAULT_TOPK_DENSITY.
 *
 * @throws {FleetError} INVALID_CONFIG for an unknown name or a density
 *   outside (0, 1], naming the value.
 */
export function parseUpdateCompression(
  name: string,
  topkDensity = DEFAULT_TOPK_DENSITY,
): UpdateCompression {
  if (!(COMPRESSION_NAMES as readonly string[]).includes(name)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `update compression "${name}" is unknown, expected one of ` +
        COMPRESSION_NAMES.join(', '),
    );
  }
  const kind = KIND_BY_NAME[name as CompressionName];
  const compression = {
    kind,
    topkDensity: kind === CompressionKind.TopK ? topkDensity : 0,
  };
  checkUpdateCompression(compression);
  return compression;
}

/**
 * Checks a compression from a round task or the options.
 *
 * @throws {FleetError} INVALID_CONFIG for a kind this build cannot encode,
 *   or a top-k density that is not in (0, 1].
 */
export function checkUpdateCompression(compression: UpdateCompression): void {
  const known = Object.values(CompressionKind) as number[];
  if (!known.includes(compression.kind)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `update compression kind ${compression.kind} is unknown, expected ` +
        `one of ${COMPRESSION_NAMES.join(', ')} (kinds 1-5)`,
    );
  }
  if (compression.kind !== CompressionKind.TopK) return;
  const density = compression.topkDensity;
  if (!(density > 0 && density <= 1)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `top-k density ${density} is out of range, expected a number in ` +
        '(0, 1], for example 0.01 to send 1% of each tensor',
    );
  }
}

/**
 * Returns the compression a round task requests, or NO_COMPRESSION when
 * it names none or Unspecified.
 *
 * @throws {FleetError} INVALID_CONFIG as checkUpdateCompression.
 */
export function compressionOfTask(task: RoundTask): UpdateCompression {
  const compression = (task as CompressedRoundTask).compression;
  if (
    compression === null ||
    compression === undefined ||
    compression.kind === CompressionKind.Unspecified
  ) {
    return NO_COMPRESSION;
  }
  checkUpdateCompression(compression);
  return { kind: compression.kind, topkDensity: compression.topkDensity };
}

/** Returns the TensorEncoding that every delta of `compression` uses. */
export function encodingOf(compression: UpdateCompression): number {
  switch (compression.kind) {
    case CompressionKind.Float16:
      return TensorEncoding.Float16;
    case CompressionKind.Int8:
    case CompressionKind.Int8Channel:
      return TensorEncoding.Int8Scaled;
    case CompressionKind.TopK:
      return TensorEncoding.TopkSparse;
    default:
      return TensorEncoding.Float32;
  }
}

/** Returns a short text such as "topk (density 0.01)" for messages. */
export function describeCompression(compression: UpdateCompression): string {
  const name = compressionNameOf(compression.kind);
  if (compression.kind !== CompressionKind.TopK) return name;
  const density = Number(Math.fround(compression.topkDensity).toPrecision(6));
  return `${name} (density ${density})`;
}

const ENCODING_NAMES: Record<number, string> = {
  [TensorEncoding.Float32]: 'float32',
  [TensorEncoding.Float16]: 'float16',
  [TensorEncoding.Int8Scaled]: 'int8',
  [TensorEncoding.TopkSparse]: 'top-k sparse',
};

/** Returns a name such as "3 (int8)" for a TensorEncoding value. */
export function describeEncoding(encoding: number): string {
  const name = ENCODING_NAMES[encoding];
  return name === undefined ? `${encoding}` : `${encoding} (${name})`;
}

/** The compression flags shared by the aggregator and simulate commands. */
export interface CompressionFlags {
  /** --update-compression: one of COMPRESSION_NAMES. */
  updateCompression?: string;
  /** --topk-density: share of each tensor that topk sends. */
  topkDensity?: number;
}

/**
 * Builds the compression of the command-line flags, or undefined when
 * neither is given (float32).
 *
 * @throws {FleetError} INVALID_CONFIG for an unknown kind, a density
 *   outside (0, 1], or --topk-density without --update-compression topk.
 */
export function compressionOfFlags(
  flags: CompressionFlags,
): UpdateCompression | undefined {
  const { updateCompression: name, topkDensity } = flags;
  if (topkDensity !== undefined && name !== 'topk') {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `--topk-density ${topkDensity} applies only to --update-compression ` +
        `topk, but the compression is ${name ?? 'float32 (the default)'}`,
    );
  }
  if (name === undefined) return undefined;
  return parseUpdateCompression(name, topkDensity);
}
