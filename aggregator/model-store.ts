import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import { sha256Hex } from '../models/index.ts';
import {
  modelDirOf,
  versionFileOf,
  versionOfManifestName,
  type ReleaseLatency,
  type VersionFileKind,
} from '../models/registry/index.ts';
import { readWeightsFile, writeWeightsFile } from '../models/weights-file.ts';
import { writeFileAtomic } from './state.ts';

/** Metadata of one stored model version (v<N>.json). */
export interface ModelManifest {
  modelName: string;
  version: number;
  /** Version the round trained from; version 0 names itself. */
  parentVersion: number;
  /** Round that produced the version; 0 for the base model. */
  round: number;
  numVehicles: number;
  numExamples: number;
  /** Top-1 accuracy on the aggregator's test split, null when not measured. */
  testAccuracy: number | null;
  /** Hex SHA-256 of the ONNX file. */
  sha256: string;
  sizeBytes: number;
  /** ISO 8601 time of creation. */
  createdAt: string;
  createdAtMs: number;
  trainableTensors: string[];
  /**
   * Rule that merged the round: an aggregation rule, 'dp-fedavg', or
   * 'base' for version 0. Manifests written before this field existed
   * lack it, as they lack the two below.
   */
  strategy?: string;
  /** Numeric parameters of `strategy`, such as byzantineCount. */
  strategyParams?: Record<string, number>;
  /** onnxruntime latency measured when the version was built. */
  latency?: ReleaseLatency;
}

/** One model version: manifest, weights and ONNX bytes. */
export interface StoredModel {
  manifest: ModelManifest;
  weights: WeightMap;
  onnx: Uint8Array;
}

/**
 * Model versions on disk under <stateDir>/models/<modelName>/: v<N>.onnx,
 * v<N>.weights.pb and v<N>.json. The manifest is written last, so a
 * version counts as stored only once all three files are complete.
 */
export class ModelStore {
  readonly dir: string;
  readonly modelName: string;

  constructor(stateDir: string, modelName: string) {
    this.modelName = modelName;
    this.dir = modelDirOf(stateDir, modelName);
  }

  /**
   * Path of one file of `version`; `kind` is onnx, weights.pb, json, or
   * release.pb for the last signed release notice of the version.
   */
  pathOf(version: number, kind: VersionFileKind): string {
    return versionFileOf(this.dir, version, kind);
  }

  /** Returns whether all files of `version` are stored. */
  has(version: number): boolean {
    return existsSync(this.pathOf(version, 'json'));
  }

  /** Stored version numbers, ascending. */
  versions(): number[] {
    if (!existsSync(this.dir)) return [];
    return readdirSync(this.dir)
      .map(versionOfManifestName)
      .filter((version) => version !== undefined)
      .sort((a, b) => a - b);
  }

  /**
   * Highest stored version, or -1 when none is stored. New versions take
   * the next number, so that a rollback never reuses one.
   */
  highestVersion(): number {
    const versions = this.versions();
    return versions.length === 0 ? -1 : versions[versions.length - 1];
  }

  /** Writes the three files of `model`, each atomically, manifest last. */
  save(model: StoredModel): void {
    const { version } = model.manifest;
    writeFileAtomic(this.pathOf(version, 'onnx'), model.onnx);
    writeWeightsFile(this.pathOf(version, 'weights.pb'), model.weights, {
      modelName: this.modelName,
      version,
    });
    const text = JSON.stringify(model.manifest, null, 2);
    writeFileAtomic(this.pathOf(version, 'json'), `${text}\n`);
  }

  /**
   * Keeps the signed release notice (an encoded SignedRelease) of a
   * stored version, so that an exported version carries its signature.
   * A later publication of the same version, after a rollback, replaces
   * it with the notice of the higher release sequence.
   */
  saveSignedRelease(version: number, notice: Uint8Array): void {
    writeFileAtomic(this.pathOf(version, 'release.pb'), notice);
  }

  /**
   * Reads `version` back.
   *
   * @throws {FleetError} INVALID_MODEL when the manifest is missing or
   *   unreadable, or the ONNX bytes do not match its digest.
   */
  load(version: number): StoredModel {
    const manifestPath = this.pathOf(version, 'json');
    if (!this.has(version)) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `model version ${version} is not stored: ${manifestPath} not found`,
      );
    }
    let manifest: ModelManifest;
    try {
      manifest = JSON.parse(
        readFileSync(manifestPath, 'utf8'),
      ) as ModelManifest;
    } catch (err) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `cannot read model manifest ${manifestPath}: ${(err as Error).message}`,
        { cause: err },
      );
    }
    const onnx = new Uint8Array(readFileSync(this.pathOf(version, 'onnx')));
    const digest = sha256Hex(onnx);
    if (digest !== manifest.sha256) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `${this.pathOf(version, 'onnx')} has SHA-256 ${digest}, but its ` +
          `manifest records ${manifest.sha256}`,
      );
    }
    const weights = readWeightsFile(this.pathOf(version, 'weights.pb'));
    return { manifest, weights, onnx };
  }
}
