import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';

import { TENSOR_SPECS, type WeightMap } from '../models/architecture.ts';
import { loadLabelledImages, resolveDataDir } from '../models/dataset.ts';
import {
  forwardFeatures,
  forwardProbabilities,
  toTensorMap,
} from '../models/forward.ts';
import { exportFeatureExtractor, exportOnnx } from '../models/onnx-export.ts';
import {
  INFERENCE_BATCH_SIZE,
  OnnxClassifier,
  OnnxFeatureExtractor,
  evaluateAccuracy,
  sha256Hex,
} from '../models/runtime.ts';
import { FleetError } from '../protocol/errors.ts';

// More than one inference batch, so the chunk boundary is exercised.
const IMAGE_COUNT = 300;
const IMAGE_VALUES = 32 * 32 * 3;
const TOLERANCE = 1e-4;
const SHAPES = new Map(TENSOR_SPECS.map((spec) => [spec.name, spec.shape]));

/** He-normal kernels and small biases, seeded; dense2 scaled up 4 times. */
function randomWeights(seed: number): WeightMap {
  const weights: WeightMap = new Map();
  TENSOR_SPECS.forEach((spec, index) => {
    const fanIn = spec.shape.slice(0, -1).reduce((a, b) => a * b, 1);
    const std = spec.name.endsWith('/kernel') ? Math.sqrt(2 / fanIn) : 0.05;
    const scale = spec.name.startsWith('dense2/') ? 4 : 1;
    const values = tf.randomNormal(
      spec.shape,
      0,
      std * scale,
      'float32',
      seed + index,
    );
    weights.set(spec.name, values.dataSync() as Float32Array);
    values.dispose();
  });
  return weights;
}

function tfjsOutput(
  weights: WeightMap,
  images: Float32Array,
  count: number,
  beforeLayer?: string,
): Float32Array {
  const tensors = toTensorMap(weights, SHAPES);
  const output = tf.tidy(() => {
    const input = tf.tensor4d(images, [count, 32, 32, 3]);
    return beforeLayer === undefined
      ? forwardProbabilities(tensors, input)
      : forwardFeatures(tensors, input, beforeLayer);
  });
  const values = output.dataSync() as Float32Array;
  tf.dispose([output, ...tensors.values()]);
  return values;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

async function assertRejectsInvalidModel(
  promise: Promise<unknown>,
): Promise<void> {
  await assert.rejects(promise, (err: unknown) => {
    assert.ok(
      err instanceof FleetError,
      `expected FleetError, got ${String(err)}`,
    );
    assert.equal(err.code, 'INVALID_MODEL');
    return true;
  });
}

let images: Float32Array;
let labels: Int32Array;
let weights: WeightMap;
let classifier: OnnxClassifier;

before(async () => {
  await tf.setBackend('wasm');
  const data = await loadLabelledImages(resolveDataDir(), {
    split: 'test',
    limit: IMAGE_COUNT,
  });
  images = data.images;
  labels = data.labels;
  weights = randomWeights(4321);
  classifier = await OnnxClassifier.create(exportOnnx(weights));
});

after(async () => {
  await classifier.close();
});

describe('OnnxClassifier', () => {
  test('predicts across batch chunks', async () => {
    assert.ok(IMAGE_COUNT > INFERENCE_BATCH_SIZE);

    const actual = await classifier.predict(images, IMAGE_COUNT);
    const expected = tfjsOutput(weights, images, IMAGE_COUNT);

    assert.equal(actual.length, IMAGE_COUNT * 43);
    const diff = maxAbsDiff(actual, expected);
    assert.ok(diff <= TOLERANCE, `max abs diff ${diff} exceeds ${TOLERANCE}`);
  });

  test('predicts zero images', async () => {
    const actual = await classifier.predict(new Float32Array(0), 0);

    assert.equal(actual.length, 0);
  });

  test('rejects mismatched image length', async () => {
    await assert.rejects(
      classifier.predict(images.subarray(0, IMAGE_VALUES * 2 - 1), 2),
      RangeError,
    );
    await assert.rejects(classifier.predict(images, -1), RangeError);
  });

  test('create rejects garbage bytes', async () => {
    const garbage = new TextEncoder().encode('definitely not an onnx model');

    await assertRejectsInvalidModel(OnnxClassifier.create(garbage));
  });

  test('create rejects feature model', async () => {
    const features = exportFeatureExtractor(weights, 'dense1');

    await assertRejectsInvalidModel(OnnxClassifier.create(features));
  });
});

describe('OnnxFeatureExtractor', () => {
  test('extracts dense1 input features', async () => {
    const extractor = await OnnxFeatureExtractor.create(
      exportFeatureExtractor(weights, 'dense1'),
    );

    const actual = await extractor.extract(images, IMAGE_COUNT);
    await extractor.close();
    const expected = tfjsOutput(weights, images, IMAGE_COUNT, 'dense1');

    assert.equal(extractor.featureSize, 1024);
    const diff = maxAbsDiff(actual, expected);
    assert.ok(diff <= TOLERANCE, `max abs diff ${diff} exceeds ${TOLERANCE}`);
  });

  test('reports conv feature size', async () => {
    const extractor = await OnnxFeatureExtractor.create(
      exportFeatureExtractor(weights, 'conv3'),
    );
    await extractor.close();

    assert.equal(extractor.featureSize, 8 * 8 * 32);
  });

  test('create rejects classifier model', async () => {
    await assertRejectsInvalidModel(
      OnnxFeatureExtractor.create(exportOnnx(weights)),
    );
  });
});

describe('evaluateAccuracy', () => {
  test('matches tfjs top-1 accuracy', async () => {
    const probabilities = tfjsOutput(weights, images, IMAGE_COUNT);
    let correct = 0;
    for (let i = 0; i < IMAGE_COUNT; i++) {
      const row = Array.from(probabilities.subarray(i * 43, (i + 1) * 43));
      if (row.indexOf(Math.max(...row)) === labels[i]) correct++;
    }

    const accuracy = await evaluateAccuracy(classifier, images, labels);

    assert.equal(accuracy, correct / IMAGE_COUNT);
  });

  test('counts all correct labels', async () => {
    const predicted = await classifier.predict(images, IMAGE_COUNT);
    const predictedLabels = Int32Array.from({ length: IMAGE_COUNT }, (_, i) => {
      const row = Array.from(predicted.subarray(i * 43, (i + 1) * 43));
      return row.indexOf(Math.max(...row));
    });

    const accuracy = await evaluateAccuracy(
      classifier,
      images,
      predictedLabels,
    );

    assert.equal(accuracy, 1);
  });

  test('rejects zero images', async () => {
    await assert.rejects(
      evaluateAccuracy(classifier, new Float32Array(0), new Int32Array(0)),
      RangeError,
    );
  });
});

describe('sha256Hex', () => {
  test('hashes known vector', () => {
    assert.equal(
      sha256Hex(new TextEncoder().encode('abc')),
      'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad',
    );
  });

  test('hashes only the view', () => {
    const model = exportOnnx(weights);
    const padded = new Uint8Array(model.length + 8);
    padded.set(model, 4);

    const digest = sha256Hex(padded.subarray(4, 4 + model.length));

    assert.equal(digest, createHash('sha256').update(model).digest('hex'));
  });
});
