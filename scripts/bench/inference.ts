/**
 * Inference of the base model on real test images: onnxruntime-node on
 * the exported ONNX file against TF.js on the same weights.
 */
import { fileURLToPath } from 'node:url';
import {
  NUM_CLASSES,
  OnnxClassifier,
  exportOnnx,
  loadLabelledImages,
  predictTfjs,
  readWeightsFile,
  selectTrainingBackend,
} from '../../models/index.ts';
import { timeRepeats } from './timing.ts';

const BASE_WEIGHTS = fileURLToPath(
  new URL('../../models/base/gtsrb-cnn-v0.weights.pb', import.meta.url),
);

export interface InferenceResult {
  images: number;
  tfjsBackend: string;
  onnxSeconds: number;
  tfjsSeconds: number;
  onnxImagesPerSecond: number;
  tfjsImagesPerSecond: number;
  /** tfjsSeconds / onnxSeconds. */
  onnxSpeedup: number;
  maxAbsProbabilityDifference: number;
  top1Agreement: number;
}

function argmax(values: Float32Array, start: number): number {
  let best = 0;
  for (let k = 1; k < NUM_CLASSES; k++) {
    if (values[start + k] > values[start + best]) best = k;
  }
  return best;
}

function compare(onnx: Float32Array, tfjs: Float32Array, count: number) {
  let maxDifference = 0;
  for (let i = 0; i < onnx.length; i++) {
    maxDifference = Math.max(maxDifference, Math.abs(onnx[i] - tfjs[i]));
  }
  let agree = 0;
  for (let i = 0; i < count; i++) {
    if (argmax(onnx, i * NUM_CLASSES) === argmax(tfjs, i * NUM_CLASSES)) {
      agree += 1;
    }
  }
  return { maxDifference, top1Agreement: agree / count };
}

export async function benchInference(options: {
  dataDir: string;
  images: number;
  repeats: number;
}): Promise<InferenceResult> {
  const weights = readWeightsFile(BASE_WEIGHTS);
  const test = await loadLabelledImages(options.dataDir, {
    split: 'test',
    limit: options.images,
  });
  const tfjsBackend = await selectTrainingBackend();
  const classifier = await OnnxClassifier.create(exportOnnx(weights));
  try {
    // One untimed call each loads kernels and warms the caches.
    const onnx = await classifier.predict(test.images, test.count);
    const tfjs = await predictTfjs(weights, test.images, test.count);
    const onnxTiming = await timeRepeats(options.repeats, () =>
      classifier.predict(test.images, test.count),
    );
    const tfjsTiming = await timeRepeats(options.repeats, () =>
      predictTfjs(weights, test.images, test.count),
    );
    const { maxDifference, top1Agreement } = compare(onnx, tfjs, test.count);
    return {
      images: test.count,
      tfjsBackend,
      onnxSeconds: onnxTiming.best,
      tfjsSeconds: tfjsTiming.best,
      onnxImagesPerSecond: test.count / onnxTiming.best,
      tfjsImagesPerSecond: test.count / tfjsTiming.best,
      onnxSpeedup: tfjsTiming.best / onnxTiming.best,
      maxAbsProbabilityDifference: maxDifference,
      top1Agreement,
    };
  } finally {
    await classifier.close();
  }
}
