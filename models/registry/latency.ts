/**
 * Inference latency of a model version, measured with onnxruntime-node
 * when the version is built, so that the registry can compare versions.
 */
import { performance } from 'node:perf_hooks';
import { IMAGE_VALUES } from '../image-decode.ts';
import { OnnxClassifier } from '../runtime.ts';

/** Latency of one image per run, as a vehicle classifies frames. */
export interface ReleaseLatency {
  /** Median time of one session.run on one image, in milliseconds. */
  p50Ms: number;
  /** 95th percentile of the same runs, in milliseconds. */
  p95Ms: number;
  /** Timed runs: each image of the batch `passes` times. */
  runs: number;
  /** Images in the fixed batch the runs cycle through. */
  imageCount: number;
  /** Source of the batch: the test split or the probe images. */
  imageSource: 'test' | 'probe';
}

/** Options of {@link measureLatency}. */
export interface LatencyOptions {
  /** Untimed runs before timing starts. Default 5. */
  warmupRuns?: number;
  /** Timed passes over the batch. Default 2. */
  passes?: number;
}

/**
 * Returns the `fraction` quantile of sorted `values` (nearest rank).
 *
 * @throws {RangeError} for an empty list.
 */
export function quantile(sorted: number[], fraction: number): number {
  if (sorted.length === 0) {
    throw new RangeError('a quantile needs at least one value, got 0');
  }
  const rank = Math.ceil(fraction * sorted.length);
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))];
}

/**
 * Times `onnx` on each of `count` NHWC images one at a time, in a fresh
 * session with the deployment's options (one intra-op thread). The first
 * runs warm up the session and are not timed.
 *
 * NOTE: the figures depend on the host and its load when the version was
 * built; compare versions measured on the same machine only.
 *
 * @throws {RangeError} for no images or a wrong image length.
 * @throws {FleetError} INVALID_MODEL when onnxruntime rejects the model.
 */
export async function measureLatency(
  onnx: Uint8Array,
  images: Float32Array,
  count: number,
  imageSource: ReleaseLatency['imageSource'],
  options: LatencyOptions = {},
): Promise<ReleaseLatency> {
  if (!Number.isSafeInteger(count) || count < 1) {
    throw new RangeError(`latency needs at least one image, got ${count}`);
  }
  if (images.length !== count * IMAGE_VALUES) {
    throw new RangeError(
      `latency images have ${images.length} values, expected ` +
        `${count * IMAGE_VALUES} for ${count} images`,
    );
  }
  const warmupRuns = options.warmupRuns ?? 5;
  const passes = options.passes ?? 2;
  const imageAt = (index: number): Float32Array =>
    images.subarray(
      (index % count) * IMAGE_VALUES,
      ((index % count) + 1) * IMAGE_VALUES,
    );

  const classifier = await OnnxClassifier.create(onnx);
  try {
    for (let i = 0; i < warmupRuns; i++) {
      await classifier.predict(imageAt(i), 1);
    }
    const times: number[] = [];
    for (let i = 0; i < passes * count; i++) {
      const start = performance.now();
      await classifier.predict(imageAt(i), 1);
      times.push(performance.now() - start);
    }
    times.sort((a, b) => a - b);
    return {
      p50Ms: round3(quantile(times, 0.5)),
      p95Ms: round3(quantile(times, 0.95)),
      runs: times.length,
      imageCount: count,
      imageSource,
    };
  } finally {
    await classifier.close();
  }
}

/** Rounds to microseconds; finer digits are timer noise. */
function round3(ms: number): number {
  return Math.round(ms * 1000) / 1000;
}

/** Images the release latency is timed on: a fixed head of the test split. */
const RELEASE_LATENCY_IMAGES = 32;

/** Images an aggregator has at hand when it builds a version. */
export interface LatencyImageSource {
  /** Test split (NHWC images, one label per image), when configured. */
  testSet?: { images: Float32Array; labels: Int32Array };
  /** Probe batch of the export check; always present. */
  probeImages: Float32Array;
  probeCount: number;
}

/**
 * Measures the latency of a new version on the first 32 images of the
 * test split, or on the probe batch when there is no test split, so that
 * every version of one aggregator is timed on the same images.
 */
export function measureReleaseLatency(
  onnx: Uint8Array,
  source: LatencyImageSource,
): Promise<ReleaseLatency> {
  const { testSet } = source;
  if (testSet === undefined) {
    return measureLatency(onnx, source.probeImages, source.probeCount, 'probe');
  }
  const count = Math.min(RELEASE_LATENCY_IMAGES, testSet.labels.length);
  const images = testSet.images.subarray(0, count * IMAGE_VALUES);
  return measureLatency(onnx, images, count, 'test');
}
