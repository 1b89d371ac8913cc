/**
 * Inference on exported models with onnxruntime-node: the classifier that
 * vehicles deploy and the frozen feature extractor that feeds local
 * training of the last layers.
 */
import { createHash } from 'node:crypto';
import * as ort from 'onnxruntime-node';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { IMAGE_CHANNELS, IMAGE_SIZE, NUM_CLASSES } from './architecture.ts';
import {
  ONNX_FEATURES_NAME,
  ONNX_INPUT_NAME,
  ONNX_OUTPUT_NAME,
} from './onnx-layout.ts';

/** Images per session.run call; bounds the memory of one call. */
export const INFERENCE_BATCH_SIZE = 256;

const IMAGE_VALUES = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS;

/**
 * Session options. One intra-op thread ran this small CNN faster than the
 * default on a 2-core machine (onnxruntime-node 1.30).
 * NOTE: hosts with more cores were not measured and may gain from more
 * threads.
 */
const SESSION_OPTIONS: ort.InferenceSession.SessionOptions = {
  intraOpNumThreads: 1,
  interOpNumThreads: 1,
  graphOptimizationLevel: 'all',
};

/** An onnxruntime session with one NHWC image input and one output. */
class BatchRunner {
  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly outputName: string,
    readonly outputSize: number,
  ) {}

  /** Loads `onnx` and checks that it has input "image" and `outputName`. */
  static async create(
    onnx: Uint8Array,
    outputName: string,
  ): Promise<BatchRunner> {
    if (!(onnx instanceof Uint8Array)) {
      throw new TypeError(
        `ONNX model must be a Uint8Array, got ${typeof onnx}`,
      );
    }
    let session: ort.InferenceSession;
    try {
      session = await ort.InferenceSession.create(onnx, SESSION_OPTIONS);
    } catch (err) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `onnxruntime failed to load the ONNX model (${onnx.byteLength} bytes): ${(err as Error).message}`,
        { cause: err },
      );
    }

    const output = session.outputMetadata.find(
      (meta) => meta.name === outputName,
    );
    const shape = output?.isTensor === true ? output.shape.slice(1) : [];
    const outputSize = shape.reduce<number>(
      (product, dim) => product * Number(dim),
      1,
    );
    if (
      !session.inputNames.includes(ONNX_INPUT_NAME) ||
      output === undefined ||
      !(outputSize > 0)
    ) {
      await session.release();
      throw new FleetError(
        ErrorCode.InvalidModel,
        `ONNX model has inputs [${session.inputNames.join(', ')}] and outputs ` +
          `[${session.outputNames.join(', ')}], expected input ${ONNX_INPUT_NAME} and ` +
          `output ${outputName} with fixed dimensions after the batch dimension`,
      );
    }
    return new BatchRunner(session, outputName, outputSize);
  }

  /** Runs `count` NHWC images in chunks of INFERENCE_BATCH_SIZE. */
  async run(images: Float32Array, count: number): Promise<Float32Array> {
    checkImages(images, count);
    const out = new Float32Array(count * this.outputSize);
    for (let start = 0; start < count; start += INFERENCE_BATCH_SIZE) {
      const size = Math.min(INFERENCE_BATCH_SIZE, count - start);
      const chunk = images.subarray(
        start * IMAGE_VALUES,
        (start + size) * IMAGE_VALUES,
      );
      const input = new ort.Tensor('float32', chunk, [
        size,
        IMAGE_SIZE,
        IMAGE_SIZE,
        IMAGE_CHANNELS,
      ]);
      const results = await this.session.run({ [ONNX_INPUT_NAME]: input });
      out.set(
        results[this.outputName].data as Float32Array,
        start * this.outputSize,
      );
    }
    return out;
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}

function checkImages(images: Float32Array, count: number): void {
  if (!(images instanceof Float32Array)) {
    throw new TypeError(`images must be a Float32Array, got ${typeof images}`);
  }
  if (!Number.isSafeInteger(count) || count < 0) {
    throw new RangeError(
      `image count must be a non-negative integer, got ${count}`,
    );
  }
  if (images.length !== count * IMAGE_VALUES) {
    throw new RangeError(
      `images have ${images.length} values, expected ${count * IMAGE_VALUES} ` +
        `for ${count} NHWC images of ${IMAGE_SIZE}x${IMAGE_SIZE}x${IMAGE_CHANNELS}`,
    );
  }
}

/** The deployed classifier: images in, class probabilities out. */
export class OnnxClassifier {
  private constructor(private readonly runner: BatchRunner) {}

  /**
   * Loads a model from exportOnnx. Throws FleetError INVALID_MODEL when
   * onnxruntime rejects it or its output is not [batch, 43] "probabilities".
   */
  static async create(onnx: Uint8Array): Promise<OnnxClassifier> {
    const runner = await BatchRunner.create(onnx, ONNX_OUTPUT_NAME);
    if (runner.outputSize !== NUM_CLASSES) {
      await runner.close();
      throw new FleetError(
        ErrorCode.InvalidModel,
        `ONNX model output ${ONNX_OUTPUT_NAME} has ${runner.outputSize} values per image, expected ${NUM_CLASSES}`,
      );
    }
    return new OnnxClassifier(runner);
  }

  /**
   * Returns softmax probabilities [count * 43] for `count` NHWC images
   * [count, 32, 32, 3] with values in [0, 1]. Throws RangeError when the
   * array length does not match `count`.
   */
  predict(images: Float32Array, count: number): Promise<Float32Array> {
    return this.runner.run(images, count);
  }

  /** Releases the onnxruntime session. */
  close(): Promise<void> {
    return this.runner.close();
  }
}

/** The frozen prefix of the model, from exportFeatureExtractor. */
export class OnnxFeatureExtractor {
  /** Values per image in the "features" output, for example 1,024. */
  readonly featureSize: number;

  private constructor(private readonly runner: BatchRunner) {
    this.featureSize = runner.outputSize;
  }

  /**
   * Loads a model from exportFeatureExtractor. Throws FleetError
   * INVALID_MODEL when onnxruntime rejects it or it has no "features" output.
   */
  static async create(onnx: Uint8Array): Promise<OnnxFeatureExtractor> {
    return new OnnxFeatureExtractor(
      await BatchRunner.create(onnx, ONNX_FEATURES_NAME),
    );
  }

  /** Returns the features [count * featureSize] of `count` NHWC images. */
  extract(images: Float32Array, count: number): Promise<Float32Array> {
    return this.runner.run(images, count);
  }

  /** Releases the onnxruntime session. */
  close(): Promise<void> {
    return this.runner.close();
  }
}

/**
 * Returns top-1 accuracy in [0, 1] of `classifier` on NHWC `images` with
 * class ids `labels`; the image count is `labels.length`. Throws
 * RangeError for zero images or when the lengths do not match.
 */
export async function evaluateAccuracy(
  classifier: OnnxClassifier,
  images: Float32Array,
  labels: Int32Array,
): Promise<number> {
  const count = labels.length;
  if (count === 0)
    throw new RangeError('accuracy needs at least one labelled image, got 0');
  const probabilities = await classifier.predict(images, count);

  let correct = 0;
  for (let i = 0; i < count; i++) {
    if (argMax(probabilities, i * NUM_CLASSES, NUM_CLASSES) === labels[i])
      correct++;
  }
  return correct / count;
}

/** Index of the largest of `length` values from `offset`; first wins ties. */
function argMax(values: Float32Array, offset: number, length: number): number {
  let best = 0;
  for (let i = 1; i < length; i++) {
    if (values[offset + i] > values[offset + best]) best = i;
  }
  return best;
}

/** Lower-case hex SHA-256 of `bytes`, as a release's modelSha256. */
export function sha256Hex(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}
