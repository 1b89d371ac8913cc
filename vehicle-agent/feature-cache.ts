/**
 * Features of a vehicle's frames at the input of the first trainable
 * layer, computed by the frozen prefix of the deployed model in
 * onnxruntime. Rounds that freeze the same prefix weights reuse them, so
 * the prefix runs once per prefix change, not once per round.
 */
import { createHash } from 'node:crypto';
import {
  LAYER_NAMES,
  tensorNamesOfLayers,
  type WeightMap,
} from '../models/architecture.ts';
import {
  OnnxFeatureExtractor,
  exportFeatureExtractor,
} from '../models/index.ts';

const VALUES_PER_IMAGE = 32 * 32 * 3;
const EXTRACT_BATCH = 512;

/**
 * Returns the hex SHA-256 of the weights of the layers before `layer`,
 * in layer order, with each tensor's name hashed before its bytes.
 */
export function hashFrozenPrefix(weights: WeightMap, layer: string): string {
  const stop = LAYER_NAMES.indexOf(layer);
  if (stop < 0) {
    throw new RangeError(
      `unknown layer ${JSON.stringify(layer)}; expected one of ` +
        LAYER_NAMES.join(', '),
    );
  }
  const hash = createHash('sha256');
  for (const name of tensorNamesOfLayers(LAYER_NAMES.slice(0, stop))) {
    const values = weights.get(name);
    if (values === undefined) {
      throw new RangeError(`weights have no tensor ${name}`);
    }
    hash.update(`${name}\0`);
    hash.update(
      new Uint8Array(values.buffer, values.byteOffset, values.byteLength),
    );
  }
  return hash.digest('hex');
}

/** Features of every frame for one layer and one frozen prefix. */
export interface CachedFeatures {
  layer: string;
  prefixSha256: string;
  /** [count, featureSize], row per frame. */
  features: Float32Array;
  featureSize: number;
}

/** Runs the frozen prefix in onnxruntime over `count` images, in batches. */
export async function extractFeatures(
  weights: WeightMap,
  layer: string,
  images: Float32Array,
  count: number,
): Promise<{ features: Float32Array; featureSize: number }> {
  const extractor = await OnnxFeatureExtractor.create(
    exportFeatureExtractor(weights, layer),
  );
  try {
    const featureSize = extractor.featureSize;
    const features = new Float32Array(count * featureSize);
    for (let start = 0; start < count; start += EXTRACT_BATCH) {
      const size = Math.min(EXTRACT_BATCH, count - start);
      const batch = images.subarray(
        start * VALUES_PER_IMAGE,
        (start + size) * VALUES_PER_IMAGE,
      );
      features.set(await extractor.extract(batch, size), start * featureSize);
    }
    return { features, featureSize };
  } finally {
    await extractor.close();
  }
}

/**
 * In-memory cache of frame features, keyed by layer and the SHA-256 of
 * the frozen prefix weights. It contains the features of one fixed set of
 * frames, so one cache serves one vehicle.
 */
export class FeatureCache {
  private readonly entries = new Map<string, CachedFeatures>();
  /** Lookups served from memory. */
  hits = 0;
  /** Lookups that ran the prefix in onnxruntime. */
  misses = 0;

  /** @param maxEntries entries kept, least recently used dropped first. */
  constructor(private readonly maxEntries = 2) {
    if (!Number.isInteger(maxEntries) || maxEntries < 1) {
      throw new RangeError(
        `maxEntries must be a positive integer, received ${maxEntries}`,
      );
    }
  }

  /** Returns the features for `layer`, computing them on a miss. */
  async get(
    weights: WeightMap,
    layer: string,
    images: Float32Array,
    count: number,
  ): Promise<CachedFeatures> {
    const prefixSha256 = hashFrozenPrefix(weights, layer);
    const key = `${layer}:${prefixSha256}`;
    const cached = this.entries.get(key);
    if (cached !== undefined) {
      this.hits += 1;
      this.entries.delete(key);
      this.entries.set(key, cached);
      return cached;
    }

    this.misses += 1;
    const { features, featureSize } = await extractFeatures(
      weights,
      layer,
      images,
      count,
    );
    const entry = { layer, prefixSha256, features, featureSize };
    this.entries.set(key, entry);
    while (this.entries.size > this.maxEntries) {
      const oldest = this.entries.keys().next().value as string;
      this.entries.delete(oldest);
    }
    return entry;
  }
}
