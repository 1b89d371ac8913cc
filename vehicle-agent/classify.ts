/** One-off classification of an image file, for the `classify` command. */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { NUM_CLASSES } from '../models/architecture.ts';
import { OnnxClassifier, className, decodeImageFile } from '../models/index.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { readDeployedModel } from './model-files.ts';

/** One class with its probability. */
export interface ClassScore {
  classId: number;
  name: string;
  probability: number;
}

/** Result of `classifyImageFile`. */
export interface ImageClassification {
  /** Deployed model version, undefined for a model given by path. */
  modelVersion: number | undefined;
  /** The ONNX file used. */
  modelSource: string;
  top: ClassScore[];
}

/**
 * Returns the `k` most probable classes of one image's probabilities,
 * most probable first.
 */
export function topClasses(
  probabilities: Float32Array,
  k: number,
): ClassScore[] {
  if (probabilities.length !== NUM_CLASSES) {
    throw new RangeError(
      `expected ${NUM_CLASSES} probabilities, received ${probabilities.length}`,
    );
  }
  const ids = Array.from({ length: NUM_CLASSES }, (_, id) => id);
  ids.sort((a, b) => probabilities[b] - probabilities[a]);
  return ids.slice(0, k).map((classId) => ({
    classId,
    name: className(classId),
    probability: probabilities[classId],
  }));
}

async function readModelPath(modelPath: string): Promise<Uint8Array> {
  try {
    return new Uint8Array(await readFile(modelPath));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'read error';
    throw new FleetError(
      ErrorCode.InvalidModel,
      `cannot read model ${modelPath} (${code})`,
      { cause: err },
    );
  }
}

/**
 * Classifies one image file with the model deployed in `stateDir` or the
 * ONNX file `modelPath` (exactly one of them).
 *
 * @throws {FleetError} INVALID_MODEL when no model is deployed or the file
 *   is not a model, DATA_NOT_FOUND or INVALID_IMAGE for the image.
 */
export async function classifyImageFile(options: {
  image: string;
  stateDir?: string;
  modelPath?: string;
  top?: number;
}): Promise<ImageClassification> {
  const { stateDir, modelPath } = options;
  if ((stateDir === undefined) === (modelPath === undefined)) {
    throw new TypeError('classify needs exactly one of stateDir and modelPath');
  }
  const stored =
    stateDir !== undefined ? await readDeployedModel(stateDir) : undefined;
  const onnx = stored?.onnx ?? (await readModelPath(modelPath!));
  const image = await decodeImageFile(options.image);

  const classifier = await OnnxClassifier.create(onnx);
  try {
    const probabilities = await classifier.predict(image, 1);
    return {
      modelVersion: stored?.version,
      modelSource:
        stored !== undefined ? path.join(stateDir!, stored.file) : modelPath!,
      top: topClasses(probabilities, options.top ?? 5),
    };
  } finally {
    await classifier.close();
  }
}
