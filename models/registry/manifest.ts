/**
 * The registry's view of a stored manifest (v<N>.json). Manifests written
 * by older aggregators lack some fields; those read as null, which the
 * command line shows as "unknown".
 */
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import { oneLine } from './file-errors.ts';
import type { ReleaseLatency } from './latency.ts';

/** One stored version's manifest, every optional fact null when absent. */
export interface RegistryManifest {
  modelName: string | null;
  version: number;
  /** Version the round trained from; version 0 names itself. */
  parentVersion: number | null;
  /** Round that produced the version; 0 for the base model. */
  round: number | null;
  /** Aggregation rule, 'dp-fedavg', or 'base' for version 0. */
  strategy: string | null;
  strategyParams: Record<string, number> | null;
  numVehicles: number | null;
  numExamples: number | null;
  /**
   * Top-1 test accuracy at release; null when the aggregator had no test
   * split, as in manifests written before the field existed.
   */
  testAccuracy: number | null;
  latency: ReleaseLatency | null;
  /** Hex SHA-256 of the ONNX file. */
  sha256: string;
  sizeBytes: number | null;
  /** ISO 8601 time of creation. */
  createdAt: string | null;
  trainableTensors: string[] | null;
}

type Fields = Record<string, unknown>;

function numberOrNull(fields: Fields, key: string): number | null {
  const value = fields[key];
  return typeof value === 'number' && Number.isFinite(value) ? value : null;
}

function stringOrNull(fields: Fields, key: string): string | null {
  const value = fields[key];
  return typeof value === 'string' ? value : null;
}

function paramsOrNull(value: unknown): Record<string, number> | null {
  if (typeof value !== 'object' || value === null) return null;
  const entries = Object.entries(value);
  const isNumeric = entries.every(([, param]) => typeof param === 'number');
  return isNumeric ? Object.fromEntries(entries) : null;
}

function latencyOrNull(value: unknown): ReleaseLatency | null {
  const latency = value as Partial<ReleaseLatency> | null;
  const isLatency =
    typeof latency === 'object' &&
    latency !== null &&
    typeof latency.p50Ms === 'number' &&
    typeof latency.p95Ms === 'number';
  return isLatency ? (latency as ReleaseLatency) : null;
}

/** Shows a field's value in an error message: JSON, on one line, short. */
function quoted(value: unknown): string {
  if (value === undefined) return 'none';
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

function tensorsOrNull(value: unknown): string[] | null {
  const isList =
    Array.isArray(value) && value.every((name) => typeof name === 'string');
  return isList ? (value as string[]) : null;
}

/**
 * Parses the text of `file`, the manifest of `version`.
 *
 * @throws {FleetError} INVALID_MODEL when the text is not JSON, names
 *   another version, or has no SHA-256 digest.
 */
export function parseManifest(
  text: string,
  file: string,
  version: number,
): RegistryManifest {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `manifest ${file} is not valid JSON: ${oneLine((err as Error).message)}`,
      { cause: err },
    );
  }
  const isObject =
    typeof parsed === 'object' && parsed !== null && !Array.isArray(parsed);
  if (!isObject) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `manifest ${file} holds ${quoted(parsed)}, expected a JSON object`,
    );
  }
  const fields = parsed as Fields;
  if (fields.version !== version) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `manifest ${file} has version ${quoted(fields.version)}, expected ` +
        `${version} as its file name says`,
    );
  }
  const sha256 = fields.sha256;
  if (typeof sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(sha256)) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `manifest ${file} has sha256 ${quoted(sha256)}, expected 64 hex digits`,
    );
  }
  return {
    modelName: stringOrNull(fields, 'modelName'),
    version,
    parentVersion: numberOrNull(fields, 'parentVersion'),
    round: numberOrNull(fields, 'round'),
    strategy: stringOrNull(fields, 'strategy'),
    strategyParams: paramsOrNull(fields.strategyParams),
    numVehicles: numberOrNull(fields, 'numVehicles'),
    numExamples: numberOrNull(fields, 'numExamples'),
    testAccuracy: numberOrNull(fields, 'testAccuracy'),
    latency: latencyOrNull(fields.latency),
    sha256,
    sizeBytes: numberOrNull(fields, 'sizeBytes'),
    createdAt: stringOrNull(fields, 'createdAt'),
    trainableTensors: tensorsOrNull(fields.trainableTensors),
  };
}
