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
  isFleetError,
  verifyEnvelope,
  type PublicKeySet,
  type SignedEnvelope,
} from '../../protocol/index.ts';
import { damagedNotice, fileReadError, oneLine } from './file-errors.ts';
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
  version: number;
  /** Always null here; a damaged version is a {@link DamagedEntry}. */
  damage: null;
  manifest: RegistryManifest;
  isCurrent: boolean;
  pin: Pin | null;
  /** Null when no signed notice was kept for the version. */
  signature: SignatureRecord | null;
  /** Files of the version that exist, with their sizes in bytes. */
  files: Array<{ kind: VersionFileKind; path: string; bytes: number }>;
}

/**
 * A stored version whose manifest or kept notice cannot be read: what
 * `list` shows instead of a {@link RegistryEntry}.
 */
export interface DamagedEntry {
  version: number;
  /** Reason the version cannot be read, on one line, naming the file. */
  damage: string;
  manifest: null;
  isCurrent: boolean;
  pin: Pin | null;
  signature: null;
  files: RegistryEntry['files'];
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

  /**
   * Reads the manifest of a stored version.
   *
   * @throws {FleetError} INVALID_MODEL when it is not stored, cannot be
   *   read or is damaged, naming the file.
   */
  manifest(version: number): RegistryManifest {
    this.requireVersion(version);
    const file = this.pathOf(version, 'json');
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw fileReadError(ErrorCode.InvalidModel, 'manifest', file, err);
    }
    return parseManifest(text, file, version);
  }

  /**
   * Returns why the manifest of stored `version` cannot be used, as one
   * line naming the file, or null when it can.
   */
  damageOf(version: number): string | null {
    try {
      this.manifest(version);
      return null;
    } catch (err) {
      if (!isFleetError(err, ErrorCode.InvalidModel)) throw err;
      return err.message;
    }
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
    const file = this.pathOf(version, 'release.pb');
    let release: ReturnType<typeof decodeModelRelease>;
    try {
      release = decodeModelRelease(envelope.signedBytes);
    } catch (err) {
      throw damagedNotice(file, err);
    }
    return {
      file,
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
    let bytes: Uint8Array;
    try {
      bytes = new Uint8Array(readFileSync(file));
    } catch (err) {
      throw fileReadError(ErrorCode.MalformedPayload, 'notice', file, err);
    }
    let envelope: SignedEnvelope | undefined;
    try {
      envelope = decodeSignedRelease(bytes);
    } catch (err) {
      throw damagedNotice(file, err);
    }
    if (envelope === undefined) {
      throw new FleetError(
        ErrorCode.MalformedPayload,
        `${file} holds an unsigned notice, expected a SignedRelease`,
      );
    }
    return envelope;
  }

  /**
   * Returns `version` and its stored ancestors, newest first, following
   * parentVersion, at most `maxLength` versions. The chain stops at
   * version 0, at a parent that is not stored (pruned) or unknown, at a
   * parent that is not older, and after a version whose manifest is
   * damaged, which ends the chain because its parent is unknown.
   */
  lineage(version: number, maxLength = Number.POSITIVE_INFINITY): number[] {
    const chain = [version];
    while (chain.length < maxLength) {
      const last = chain[chain.length - 1];
      if (this.damageOf(last) !== null) break;
      const parent = this.manifest(last).parentVersion;
      const isStoredAncestor =
        parent !== null &&
        parent < last &&
        existsSync(this.pathOf(parent, 'json'));
      if (!isStoredAncestor) break;
      chain.push(parent);
    }
    return chain;
  }

  /**
   * Collects the manifest, state and files of one version.
   *
   * @throws {FleetError} INVALID_MODEL when the version is not stored or
   *   its manifest is damaged, MALFORMED_PAYLOAD when its kept notice is.
   */
  entry(
    version: number,
    current = this.currentVersion(),
    pins = this.pins(),
  ): RegistryEntry {
    return {
      version,
      damage: null,
      manifest: this.manifest(version),
      isCurrent: version === current,
      pin: pins.get(version) ?? null,
      signature: this.signature(version),
      files: this.#filesOf(version),
    };
  }

  /**
   * Collects every stored version, oldest first. A version whose
   * manifest or kept notice cannot be read is listed as a DamagedEntry
   * with the reason, so that one damaged file does not hide the others.
   *
   * @throws {FleetError} INVALID_CONFIG when state.json or pins.json is
   *   damaged.
   */
  list(): Array<RegistryEntry | DamagedEntry> {
    const current = this.currentVersion();
    const pins = this.pins();
    return this.versions().map((version) => {
      try {
        return this.entry(version, current, pins);
      } catch (err) {
        if (!isFleetError(err)) throw err;
        return {
          version,
          damage: oneLine(err.message),
          manifest: null,
          isCurrent: version === current,
          pin: pins.get(version) ?? null,
          signature: null,
          files: this.#filesOf(version),
        };
      }
    });
  }

  #filesOf(version: number): RegistryEntry['files'] {
    return VERSION_FILE_KINDS.map((kind) => ({
      kind,
      path: this.pathOf(version, kind),
    }))
      .filter((file) => existsSync(file.path))
      .map((file) => ({ ...file, bytes: statSync(file.path).size }));
  }
}
