/**
 * Read access to the aggregator's model store, plus the registry's pins.
 * The aggregator may run at the same time: it only adds versions and
 * rewrites state.json atomically, so every read here gets whole files.
 */
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import {
  ErrorCode,
  FleetError,
  decodeModelRelease,
  decodeSignedRelease,
  verifyEnvelope,
  type PublicKeySet,
  type SignedEnvelope,
} from '../../protocol/index.ts';
import type { WeightMap } from '../architecture.ts';
import { sha256Hex } from '../runtime.ts';
import { readWeightsFile } from '../weights-file.ts';
import {
  VERSION_FILE_KINDS,
  modelDirOf,
  versionFileOf,
  versionOfManifestName,
  type VersionFileKind,
} from './layout.ts';
import { parseManifest, type RegistryManifest } from './manifest.ts';
import { readPins, writePins, type Pin } from './pins.ts';

/** The signed release notice kept for a version (v<N>.release.pb). */
export interface SignatureRecord {
  file: string;
  keyId: string;
  releaseSequence: number;
  /** Hex of the Ed25519 signature. */
  signatureHex: string;
  /** Version and file digest that the signed notice names. */
  signedVersion: number;
  signedSha256: string;
}

/** Facts the registry collects about one version. */
export interface RegistryEntry {
  manifest: RegistryManifest;
  isCurrent: boolean;
  pin: Pin | null;
  /** Null when no signed notice was kept for the version. */
  signature: SignatureRecord | null;
  /** Files of the version that exist, with their sizes in bytes. */
  files: Array<{ kind: VersionFileKind; path: string; bytes: number }>;
}

/** Formats version numbers as ranges: 0-3, 7, 9-10. */
export function formatVersions(versions: number[]): string {
  const parts: string[] = [];
  for (let i = 0; i < versions.length; i++) {
    let end = i;
    while (versions[end + 1] === versions[end] + 1) end++;
    parts.push(
      end === i ? `${versions[i]}` : `${versions[i]}-${versions[end]}`,
    );
    i = end;
  }
  return parts.length === 0 ? 'none' : parts.join(', ');
}

/**
 * The stored versions of one model in an aggregator's state directory.
 */
export class ModelRegistry {
  readonly stateDir: string;
  readonly modelName: string;
  /** Folder of the version files, `<stateDir>/models/<modelName>`. */
  readonly dir: string;

  private constructor(stateDir: string, modelName: string) {
    this.stateDir = stateDir;
    this.modelName = modelName;
    this.dir = modelDirOf(stateDir, modelName);
  }

  /**
   * Opens the store of `modelName` in `stateDir`.
   *
   * @throws {FleetError} INVALID_CONFIG when the folder does not exist.
   */
  static open(stateDir: string, modelName: string): ModelRegistry {
    const registry = new ModelRegistry(stateDir, modelName);
    if (!existsSync(registry.dir) || !statSync(registry.dir).isDirectory()) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `no model store at ${registry.dir}: --state-dir must name the ` +
          "aggregator's state directory (its default is state/aggregator)",
      );
    }
    return registry;
  }

  /** Path of one file of `version`. */
  pathOf(version: number, kind: VersionFileKind): string {
    return versionFileOf(this.dir, version, kind);
  }

  /** Stored version numbers (those with a manifest), ascending. */
  versions(): number[] {
    return readdirSync(this.dir)
      .map(versionOfManifestName)
      .filter((version) => version !== undefined)
      .sort((a, b) => a - b);
  }

  /**
   * Checks that `version` is stored.
   *
   * @throws {FleetError} INVALID_MODEL naming the stored versions.
   */
  requireVersion(version: number): void {
    if (existsSync(this.pathOf(version, 'json'))) return;
    throw new FleetError(
      ErrorCode.InvalidModel,
      `model version ${version} is not stored in ${this.dir} (stored ` +
        `versions: ${formatVersions(this.versions())})`,
    );
  }

  /** Reads the manifest of a stored version. */
  manifest(version: number): RegistryManifest {
    this.requireVersion(version);
    const file = this.pathOf(version, 'json');
    return parseManifest(readFileSync(file, 'utf8'), file, version);
  }

  /**
   * Version that state.json names as current; null when there is no
   * state.json yet.
   *
   * @throws {FleetError} INVALID_CONFIG when state.json is unreadable.
   */
  currentVersion(): number | null {
    const file = path.join(this.stateDir, 'state.json');
    if (!existsSync(file)) return null;
    let version: unknown;
    try {
      version = (
        JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>
      ).modelVersion;
    } catch (err) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `cannot read aggregator state ${file}: ${(err as Error).message}`,
        { cause: err },
      );
    }
    if (!Number.isSafeInteger(version) || (version as number) < 0) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `aggregator state ${file} has modelVersion ${String(version)}, ` +
          'expected an integer >= 0',
      );
    }
    return version as number;
  }

  /**
   * Versions whose release chunks the broker may still retain, from the
   * aggregator's releases.json: the current release and the previous
   * one. An unreadable record counts as empty.
   */
  retainedReleaseVersions(): number[] {
    const file = path.join(this.stateDir, 'releases.json');
    try {
      const record = JSON.parse(readFileSync(file, 'utf8')) as {
        retained?: Array<{ version?: unknown }>;
      };
      return (record.retained ?? [])
        .map((entry) => entry.version)
        .filter((version): version is number => Number.isSafeInteger(version));
    } catch {
      return [];
    }
  }

  /** Pinned versions; prune never deletes them. */
  pins(): Map<number, Pin> {
    return readPins(this.dir);
  }

  /**
   * Pins a stored version, replacing the reason of an existing pin.
   *
   * @throws {FleetError} INVALID_MODEL when the version is not stored.
   */
  pin(version: number, reason: string): Pin {
    this.requireVersion(version);
    const pins = this.pins();
    const pin = { version, reason, pinnedAt: new Date().toISOString() };
    pins.set(version, pin);
    writePins(this.dir, pins);
    return pin;
  }

  /**
   * Removes the pin of `version`.
   *
   * @throws {FleetError} INVALID_CONFIG when the version is not pinned.
   */
  unpin(version: number): void {
    const pins = this.pins();
    if (!pins.delete(version)) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `model version ${version} is not pinned (pinned versions: ` +
          `${formatVersions([...pins.keys()].sort((a, b) => a - b))})`,
      );
    }
    writePins(this.dir, pins);
  }

  /**
   * Reads the signed release notice kept for `version`; null when there
   * is none.
   *
   * @throws {FleetError} MALFORMED_PAYLOAD when the file is not a
   *   SignedRelease.
   */
  signature(version: number): SignatureRecord | null {
    const envelope = this.#readEnvelope(version);
    if (envelope === undefined) return null;
    const release = decodeModelRelease(envelope.signedBytes);
    return {
      file: this.pathOf(version, 'release.pb'),
      keyId: envelope.keyId,
      releaseSequence: release.releaseSequence ?? 0,
      signatureHex: Buffer.from(envelope.signature).toString('hex'),
      signedVersion: release.version,
      signedSha256: release.sha256,
    };
  }

  /**
   * Checks the kept notice of `version` against trusted release keys and
   * the manifest's digest.
   *
   * @throws {FleetError} NOT_SIGNED without a kept notice, UNKNOWN_KEY or
   *   INVALID_SIGNATURE from the check, DIGEST_MISMATCH when the notice
   *   names another file.
   */
  verifySignature(version: number, keys: PublicKeySet): SignatureRecord {
    const envelope = this.#readEnvelope(version);
    if (envelope === undefined) {
      throw new FleetError(
        ErrorCode.NotSigned,
        `model version ${version} has no signed release notice ` +
          `(${this.pathOf(version, 'release.pb')} not found)`,
      );
    }
    verifyEnvelope('release', envelope, keys);
    const record = this.signature(version)!;
    const { sha256 } = this.manifest(version);
    if (record.signedSha256 !== sha256 || record.signedVersion !== version) {
      throw new FleetError(
        ErrorCode.DigestMismatch,
        `the signed notice of model version ${version} names version ` +
          `${record.signedVersion} with SHA-256 ${record.signedSha256}, but ` +
          `the manifest records ${sha256}`,
      );
    }
    return record;
  }

  #readEnvelope(version: number): SignedEnvelope | undefined {
    this.requireVersion(version);
    const file = this.pathOf(version, 'release.pb');
    if (!existsSync(file)) return undefined;
    const envelope = decodeSignedRelease(new Uint8Array(readFileSync(file)));
    if (envelope === undefined) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `${file} holds an unsigned notice, expected a SignedRelease`,
      );
    }
    return envelope;
  }

  /**
   * Reads the ONNX file of `version` and checks it against the manifest.
   *
   * @throws {FleetError} INVALID_MODEL when it is missing or its digest
   *   differs.
   */
  readOnnx(version: number): Uint8Array {
    const { sha256 } = this.manifest(version);
    const file = this.pathOf(version, 'onnx');
    if (!existsSync(file)) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `model version ${version} has a manifest but no ONNX file ${file}`,
      );
    }
    const onnx = new Uint8Array(readFileSync(file));
    const digest = sha256Hex(onnx);
    if (digest !== sha256) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `${file} has SHA-256 ${digest}, but its manifest records ${sha256}`,
      );
    }
    return onnx;
  }

  /** Reads the weights of a stored version. */
  readWeights(version: number): WeightMap {
    this.requireVersion(version);
    return readWeightsFile(this.pathOf(version, 'weights.pb'));
  }

  /**
   * Returns `version` and its stored ancestors, newest first, following
   * parentVersion. The chain stops at version 0, at a parent that is not
   * stored (pruned) or unknown, and at a parent that is not older.
   */
  lineage(version: number): number[] {
    const chain = [version];
    let parent = this.manifest(version).parentVersion;
    while (
      parent !== null &&
      parent < chain[chain.length - 1] &&
      existsSync(this.pathOf(parent, 'json'))
    ) {
      chain.push(parent);
      parent = this.manifest(parent).parentVersion;
    }
    return chain;
  }

  /** Collects the manifest, state and files of one version. */
  entry(version: number, current = this.currentVersion()): RegistryEntry {
    const manifest = this.manifest(version);
    const files = VERSION_FILE_KINDS.map((kind) => ({
      kind,
      path: this.pathOf(version, kind),
    }))
      .filter((file) => existsSync(file.path))
      .map((file) => ({ ...file, bytes: statSync(file.path).size }));
    return {
      manifest,
      isCurrent: version === current,
      pin: this.pins().get(version) ?? null,
      signature: this.signature(version),
      files,
    };
  }
}
