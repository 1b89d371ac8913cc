import { ErrorCode, FleetError, countElements } from '../protocol/index.ts';
import { TENSOR_SPECS, type WeightMap } from '../models/architecture.ts';
import {
  OnnxClassifier,
  evaluateAccuracy,
  exportOnnx,
  sha256Hex,
} from '../models/index.ts';
import { predictTfjs } from '../models/training.ts';
import type { TestSet } from './options.ts';

/** An exported model that matched TF.js on the probe batch. */
export interface CheckedExport {
  onnx: Uint8Array;
  sha256: string;
  /** Maximum |onnx - tfjs| over the probe batch's probabilities. */
  maxAbsDiff: number;
  /** Top-1 accuracy on the test set, undefined without one. */
  testAccuracy: number | undefined;
}

/** Inputs of {@link exportAndCheck}. */
export interface ExportCheckOptions {
  probeImages: Float32Array;
  probeCount: number;
  toleranceAbs: number;
  testSet?: TestSet;
  docString?: string;
}

/**
 * Checks that `weights` has every tensor of the architecture at its size.
 *
 * @throws {FleetError} INVALID_MODEL naming the first bad tensor.
 */
export function checkWeights(weights: WeightMap, source: string): void {
  for (const spec of TENSOR_SPECS) {
    const values = weights.get(spec.name);
    const expected = countElements(spec.shape);
    if (values === undefined || values.length !== expected) {
      throw new FleetError(
        ErrorCode.InvalidModel,
        `${source}: tensor ${spec.name} has ` +
          `${values === undefined ? 'no values' : `${values.length} values`}, ` +
          `expected ${expected} (shape [${spec.shape.join(', ')}])`,
      );
    }
  }
}

/**
 * Exports `weights` to ONNX, runs the probe batch through onnxruntime and
 * TF.js, and measures test accuracy with onnxruntime when a test set is
 * given.
 *
 * @throws {FleetError} EXPORT_MISMATCH when a probability differs by more
 *   than `toleranceAbs`.
 */
export async function exportAndCheck(
  weights: WeightMap,
  options: ExportCheckOptions,
): Promise<CheckedExport> {
  const onnx = exportOnnx(weights, { docString: options.docString });
  const classifier = await OnnxClassifier.create(onnx);
  try {
    const { probeImages, probeCount } = options;
    const fromOnnx = await classifier.predict(probeImages, probeCount);
    const fromTfjs = await predictTfjs(weights, probeImages, probeCount);
    const maxAbsDiff = maxAbsDifference(fromOnnx, fromTfjs);
    if (!(maxAbsDiff <= options.toleranceAbs)) {
      throw new FleetError(
        ErrorCode.ExportMismatch,
        `exported ONNX differs from TF.js by ${maxAbsDiff} on ${probeCount} ` +
          `probe images, above the tolerance of ${options.toleranceAbs}`,
      );
    }

    const testAccuracy =
      options.testSet === undefined
        ? undefined
        : await evaluateAccuracy(
            classifier,
            options.testSet.images,
            options.testSet.labels,
          );
    return { onnx, sha256: sha256Hex(onnx), maxAbsDiff, testAccuracy };
  } finally {
    await classifier.close();
  }
}

/** Returns max |a[i] - b[i]|; NaN anywhere or a length mismatch gives NaN. */
export function maxAbsDifference(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Number.NaN;
  let max = 0;
  for (let i = 0; i < a.length; i++) {
    const diff = Math.abs(a[i] - b[i]);
    if (Number.isNaN(diff)) return Number.NaN;
    if (diff > max) max = diff;
  }
  return max;
}
