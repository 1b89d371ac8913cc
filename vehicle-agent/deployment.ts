/**
 * The model a vehicle serves: the current version and the one before it,
 * each loaded in onnxruntime, with their files in the state directory.
 */
import type { WeightMap } from '../models/architecture.ts';
import {
  OnnxClassifier,
  importOnnxWeights,
  sha256Hex,
} from '../models/index.ts';
import {
  ErrorCode,
  FleetError,
  type Logger,
  type ModelRelease,
} from '../protocol/index.ts';
import {
  modelFileOf,
  readModelFile,
  readPointer,
  removeModelFile,
  writeModelFile,
  writePointer,
  type ModelFileRecord,
  type StoredModel,
} from './model-files.ts';

/** A model version loaded for inference and training. */
export interface DeployedModel extends ModelFileRecord {
  onnx: Uint8Array;
  /** Weights read back from the ONNX file (TF.js layout). */
  weights: WeightMap;
  classifier: OnnxClassifier;
}

/** Model bytes and identity, of a downloaded release or a model file. */
export type ModelSource = Pick<
  StoredModel,
  'modelName' | 'version' | 'sha256' | 'onnx'
>;

/**
 * Checks an ONNX file against the `sizeBytes` and `sha256` of its release
 * notice.
 *
 * @throws {FleetError} DIGEST_MISMATCH when either differs.
 */
export function verifyRelease(release: ModelRelease, onnx: Uint8Array): void {
  if (onnx.length !== release.sizeBytes) {
    throw new FleetError(
      ErrorCode.DigestMismatch,
      `release version ${release.version} has ${onnx.length} ONNX ` +
        `bytes, but sizeBytes says ${release.sizeBytes}`,
    );
  }
  const digest = sha256Hex(onnx);
  if (digest !== release.sha256.toLowerCase()) {
    throw new FleetError(
      ErrorCode.DigestMismatch,
      `release version ${release.version} has SHA-256 ${digest}, but the ` +
        `release names ${release.sha256}`,
    );
  }
}

/** Classifier wrapper that closes its session once idle after retirement. */
class ServingSession {
  private activeCalls = 0;
  private retired = false;

  constructor(readonly classifier: OnnxClassifier) {}

  async predict(images: Float32Array, count: number): Promise<Float32Array> {
    this.activeCalls += 1;
    try {
      return await this.classifier.predict(images, count);
    } finally {
      this.activeCalls -= 1;
      if (this.retired && this.activeCalls === 0) await this.classifier.close();
    }
  }

  async retire(): Promise<void> {
    if (this.retired) return;
    this.retired = true;
    if (this.activeCalls === 0) await this.classifier.close();
  }
}

interface Slot {
  model: DeployedModel;
  session: ServingSession;
}

async function loadModel(source: ModelSource, file: string): Promise<Slot> {
  const weights = importOnnxWeights(source.onnx);
  const classifier = await OnnxClassifier.create(source.onnx);
  const model: DeployedModel = {
    modelName: source.modelName,
    version: source.version,
    sha256: source.sha256.toLowerCase(),
    file,
    onnx: source.onnx,
    weights,
    classifier,
  };
  return { model, session: new ServingSession(classifier) };
}

function recordOf(model: DeployedModel): ModelFileRecord {
  const { modelName, version, sha256, file } = model;
  return { modelName, version, sha256, file };
}

/**
 * The current and previous model of one vehicle. Calls to `deploy` and
 * `rollback` must not overlap; the agent runs them one at a time.
 */
export class ModelDeployment {
  private currentSlot: Slot | undefined;
  private previousSlot: Slot | undefined;

  constructor(
    readonly stateDir: string,
    private readonly log: Logger,
  ) {}

  /** The model in service, or undefined before the first deployment. */
  get current(): DeployedModel | undefined {
    return this.currentSlot?.model;
  }

  /** The model served before the current one, kept for rollback. */
  get previous(): DeployedModel | undefined {
    return this.previousSlot?.model;
  }

  /** Returns the loaded model with this version and digest, if any. */
  find(version: number, sha256: string): DeployedModel | undefined {
    const digest = sha256.toLowerCase();
    for (const slot of [this.currentSlot, this.previousSlot]) {
      if (slot?.model.version === version && slot.model.sha256 === digest) {
        return slot.model;
      }
    }
    return undefined;
  }

  /**
   * Loads the models named by `current.json`. A damaged current model is
   * logged and skipped, so the agent starts without one and waits for the
   * retained release.
   */
  async restore(): Promise<DeployedModel | undefined> {
    let pointer;
    try {
      pointer = await readPointer(this.stateDir);
    } catch (err) {
      this.log.warn({ err }, 'deployed model state unreadable');
      return undefined;
    }
    if (pointer === undefined) return undefined;

    this.currentSlot = await this.tryLoad(pointer);
    if (this.currentSlot !== undefined && pointer.previous !== null) {
      this.previousSlot = await this.tryLoad(pointer.previous);
    }
    return this.current;
  }

  private async tryLoad(record: ModelFileRecord): Promise<Slot | undefined> {
    try {
      const stored = await readModelFile(this.stateDir, record);
      return await loadModel(stored, record.file);
    } catch (err) {
      this.log.warn(
        { err, modelVersion: record.version },
        'stored model not restored',
      );
      return undefined;
    }
  }

  /**
   * Loads a verified model, writes its file, points `current.json` at it
   * and swaps it in. The old current model becomes the previous one, and
   * the model before that is closed once its running calls finish and its
   * file is deleted. When loading or writing fails the deployment stays
   * as it was.
   *
   * @throws {FleetError} INVALID_MODEL when the ONNX is not this model.
   */
  async deploy(source: ModelSource): Promise<DeployedModel> {
    const slot = await loadModel(source, modelFileOf(source.version));
    const retiring = this.previousSlot;
    try {
      await writeModelFile(this.stateDir, source.version, source.onnx);
      await this.commit(slot, this.currentSlot);
    } catch (err) {
      await slot.session.retire();
      throw err;
    }

    if (retiring !== undefined) {
      await retiring.session.retire();
      const inUse = [this.current?.file, this.previous?.file];
      if (!inUse.includes(retiring.model.file)) {
        await removeModelFile(this.stateDir, retiring.model.file);
      }
    }
    return slot.model;
  }

  /**
   * Serves the previous model again; the current one becomes previous.
   *
   * @throws {FleetError} INVALID_MODEL when there is no previous model.
   */
  async rollback(): Promise<DeployedModel> {
    if (this.previousSlot === undefined) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `no previous model to roll back to from version ${this.current?.version}`,
      );
    }
    const target = this.previousSlot;
    await this.commit(target, this.currentSlot);
    return target.model;
  }

  private async commit(next: Slot, previous: Slot | undefined): Promise<void> {
    await writePointer(this.stateDir, {
      ...recordOf(next.model),
      deployedAtMs: Date.now(),
      previous: previous === undefined ? null : recordOf(previous.model),
    });
    this.currentSlot = next;
    this.previousSlot = previous;
  }

  /**
   * Classifies `count` images (NHWC [count,32,32,3], values in [0,1]) with
   * the current model. Returns probabilities [count*43].
   *
   * @throws {FleetError} INVALID_MODEL when no model is deployed.
   */
  async classify(images: Float32Array, count: number): Promise<Float32Array> {
    const slot = this.currentSlot;
    if (slot === undefined) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        'no model deployed yet; wait for a release',
      );
    }
    return slot.session.predict(images, count);
  }

  /**
   * Classifies with `model` while it is current or previous, so that an
   * evaluation can run both on the same frames. A model retired in the
   * meantime finishes its running calls before its session closes.
   *
   * @throws {FleetError} INVALID_MODEL when `model` is no longer loaded.
   */
  async classifyWith(
    model: DeployedModel,
    images: Float32Array,
    count: number,
  ): Promise<Float32Array> {
    const slot = [this.currentSlot, this.previousSlot].find(
      (candidate) => candidate?.model === model,
    );
    if (slot === undefined) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `model version ${model.version} is no longer loaded`,
      );
    }
    return slot.session.predict(images, count);
  }

  /** Closes both sessions. */
  async close(): Promise<void> {
    const slots = [this.currentSlot, this.previousSlot];
    this.currentSlot = undefined;
    this.previousSlot = undefined;
    for (const slot of slots) await slot?.session.retire();
  }
}
