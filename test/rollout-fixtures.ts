/**
 * Helpers for rollout tests: a model store with stored versions, a good
 * and a degraded variant of the base model, and polling.
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ModelStore, type StoredModel } from '../aggregator/model-store.ts';
import { MODEL_NAME, type WeightMap } from '../models/architecture.ts';
import { createRandom, exportOnnx, sha256Hex } from '../models/index.ts';
import { readWeightsFile } from '../models/weights-file.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));

/** Reads the base model's weights (version 0). */
export function readBaseWeights(): WeightMap {
  return readWeightsFile(
    path.join(REPOSITORY_ROOT, 'models/base/gtsrb-cnn-v0.weights.pb'),
  );
}

/**
 * Adds `shift` to every weight of the last dense kernel. Each class logit
 * moves by the same amount, so softmax, and with it every prediction,
 * stays as it was: a new version that behaves like the base model.
 */
export function shiftLastKernel(weights: WeightMap, shift: number): WeightMap {
  const next = new Map(weights);
  const kernel = Float32Array.from(weights.get('dense2/kernel')!);
  for (let i = 0; i < kernel.length; i++) kernel[i] += shift;
  next.set('dense2/kernel', kernel);
  return next;
}

/**
 * Shuffles the values of the last dense layer (kernel and bias) with a
 * seeded permutation: the same value range, but predictions near chance.
 */
export function scrambleLastLayer(weights: WeightMap, seed: number): WeightMap {
  const random = createRandom(seed);
  const next = new Map(weights);
  for (const name of ['dense2/kernel', 'dense2/bias']) {
    const values = Float32Array.from(weights.get(name)!);
    for (let i = values.length - 1; i > 0; i--) {
      const j = Math.floor(random() * (i + 1));
      [values[i], values[j]] = [values[j], values[i]];
    }
    next.set(name, values);
  }
  return next;
}

/** Stores `weights` as `version` in a model store under `stateDir`. */
export function storeVersion(
  stateDir: string,
  version: number,
  weights: WeightMap,
): StoredModel {
  const onnx = exportOnnx(weights);
  const model: StoredModel = {
    manifest: {
      modelName: MODEL_NAME,
      version,
      parentVersion: Math.max(version - 1, 0),
      round: version,
      numVehicles: 0,
      numExamples: 0,
      testAccuracy: null,
      sha256: sha256Hex(onnx),
      sizeBytes: onnx.byteLength,
      createdAt: new Date().toISOString(),
      createdAtMs: Date.now(),
      trainableTensors: ['dense2/kernel', 'dense2/bias'],
    },
    weights,
    onnx,
  };
  new ModelStore(stateDir, MODEL_NAME).save(model);
  return model;
}

/** A new temporary directory. */
export function temporaryDir(prefix: string): string {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

/** Polls `condition` every 50 ms until it holds or `timeoutMs` passes. */
export async function waitUntil(
  condition: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 30_000,
): Promise<void> {
  const stopAt = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > stopAt) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
