import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';
import onnxProto from 'onnx-proto';

import { TENSOR_SPECS, type WeightMap } from '../models/architecture.ts';
import {
  createRandom,
  loadLabelledImages,
  resolveDataDir,
} from '../models/dataset.ts';
import {
  forwardFeatures,
  forwardProbabilities,
  toTensorMap,
} from '../models/forward.ts';
import { exportFeatureExtractor, exportOnnx } from '../models/onnx-export.ts';
import { importOnnxWeights } from '../models/onnx-import.ts';
import { OnnxClassifier, OnnxFeatureExtractor } from '../models/runtime.ts';
import { FleetError } from '../protocol/errors.ts';

const { onnx } = onnxProto;

const IMAGE_COUNT = 256;
const TOLERANCE = 1e-4;
const SHAPES = new Map(TENSOR_SPECS.map((spec) => [spec.name, spec.shape]));

/** He-normal kernels and small biases, seeded; `logitScale` sharpens dense2. */
function randomWeights(seed: number, logitScale = 1): WeightMap {
  const weights: WeightMap = new Map();
  TENSOR_SPECS.forEach((spec, index) => {
    const isKernel = spec.name.endsWith('/kernel');
    const fanIn = spec.shape.slice(0, -1).reduce((a, b) => a * b, 1);
    const std = isKernel ? Math.sqrt(2 / fanIn) : 0.05;
    const scale = spec.name.startsWith('dense2/') ? logitScale : 1;
    const values = tf.tidy(() =>
      tf.randomNormal(spec.shape, 0, std * scale, 'float32', seed + index),
    );
    weights.set(spec.name, values.dataSync() as Float32Array);
    values.dispose();
  });
  return weights;
}

/**
 * Trains dense1 and dense2 on frozen random conv features with Adam, so
 * the probabilities are as peaked as a trained model's.
 */
function trainDenseLayers(
  base: WeightMap,
  images: Float32Array,
  labels: Int32Array,
): WeightMap {
  const count = labels.length;
  const tensors = toTensorMap(base, SHAPES);
  // The loader returns images sorted by class, so shuffle before batching.
  const order = tf.tensor1d(shuffledIndices(count, 5), 'int32');
  const features = tf.tidy(() =>
    tf.gather(
      forwardFeatures(
        tensors,
        tf.tensor4d(images, [count, 32, 32, 3]),
        'dense1',
      ),
      order,
    ),
  );
  const oneHot = tf.tidy(() =>
    tf.oneHot(tf.gather(tf.tensor1d(labels, 'int32'), order), 43),
  );
  const names = [
    'dense1/kernel',
    'dense1/bias',
    'dense2/kernel',
    'dense2/bias',
  ];
  const variables = new Map(
    names.map((name) => [name, tf.variable(tensors.get(name)!)]),
  );
  const optimizer = tf.train.adam(0.003);

  const batchSize = 125;
  const merged = new Map([...tensors, ...variables]);
  for (let epoch = 0; epoch < 30; epoch++) {
    for (let start = 0; start + batchSize <= count; start += batchSize) {
      optimizer.minimize(() => {
        const batch = features.slice(start, batchSize);
        const logits = forwardLogitsFromFeatures(merged, batch);
        return tf.losses.softmaxCrossEntropy(
          oneHot.slice(start, batchSize),
          logits,
        ) as tf.Scalar;
      });
    }
  }

  const trained: WeightMap = new Map(base);
  for (const [name, variable] of variables) {
    trained.set(name, variable.dataSync() as Float32Array);
    variable.dispose();
  }
  optimizer.dispose();
  tf.dispose([order, features, oneHot, ...tensors.values()]);
  return trained;
}

function shuffledIndices(count: number, seed: number): Int32Array {
  const random = createRandom(seed);
  const indices = Int32Array.from({ length: count }, (_, i) => i);
  for (let i = count - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [indices[i], indices[j]] = [indices[j], indices[i]];
  }
  return indices;
}

function forwardLogitsFromFeatures(
  weights: Map<string, tf.Tensor>,
  features: tf.Tensor,
): tf.Tensor {
  const hidden = tf.relu(
    tf.add(
      tf.matMul(
        features as tf.Tensor2D,
        weights.get('dense1/kernel') as tf.Tensor2D,
      ),
      weights.get('dense1/bias')!,
    ),
  );
  return tf.add(
    tf.matMul(
      hidden as tf.Tensor2D,
      weights.get('dense2/kernel') as tf.Tensor2D,
    ),
    weights.get('dense2/bias')!,
  );
}

function tfjsProbabilities(
  weights: WeightMap,
  images: Float32Array,
  count: number,
): Float32Array {
  const tensors = toTensorMap(weights, SHAPES);
  const probabilities = tf.tidy(() =>
    forwardProbabilities(tensors, tf.tensor4d(images, [count, 32, 32, 3])),
  );
  const values = probabilities.dataSync() as Float32Array;
  tf.dispose([probabilities, ...tensors.values()]);
  return values;
}

function tfjsFeatures(
  weights: WeightMap,
  images: Float32Array,
  count: number,
  beforeLayer: string,
): Float32Array {
  const tensors = toTensorMap(weights, SHAPES);
  const features = tf.tidy(() =>
    forwardFeatures(
      tensors,
      tf.tensor4d(images, [count, 32, 32, 3]),
      beforeLayer,
    ),
  );
  const values = features.dataSync() as Float32Array;
  tf.dispose([features, ...tensors.values()]);
  return values;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

function topClasses(probabilities: Float32Array, classes = 43): number[] {
  const top: number[] = [];
  for (let offset = 0; offset < probabilities.length; offset += classes) {
    let best = 0;
    for (let c = 1; c < classes; c++) {
      if (probabilities[offset + c] > probabilities[offset + best]) best = c;
    }
    top.push(best);
  }
  return top;
}

function meanTopProbability(probabilities: Float32Array, classes = 43): number {
  let sum = 0;
  for (let offset = 0; offset < probabilities.length; offset += classes) {
    sum += Math.max(...probabilities.subarray(offset, offset + classes));
  }
  return sum / (probabilities.length / classes);
}

async function onnxProbabilities(
  model: Uint8Array,
  images: Float32Array,
  count: number,
): Promise<Float32Array> {
  const classifier = await OnnxClassifier.create(model);
  try {
    return await classifier.predict(images, count);
  } finally {
    await classifier.close();
  }
}

/** Finds a python3 that imports onnx; undefined when there is none. */
function findPythonWithOnnx(): string | undefined {
  const candidates = [
    process.env.FLEETLEARN_PYTHON,
    'python3',
    '/usr/bin/python3',
  ];
  return candidates.find(
    (python) =>
      python !== undefined &&
      spawnSync(python, ['-c', 'import onnx'], { stdio: 'ignore' }).status ===
        0,
  );
}

const CHECK_SCRIPT =
  'import sys, onnx\n' +
  'model = onnx.load(sys.argv[1])\n' +
  'onnx.checker.check_model(model, full_check=True)\n' +
  'print(model.ir_version, model.opset_import[0].version)\n';

function assertInvalidModel(action: () => unknown, pattern: RegExp): void {
  assert.throws(action, (err: unknown) => {
    assert.ok(
      err instanceof FleetError,
      `expected FleetError, got ${String(err)}`,
    );
    assert.equal(err.code, 'INVALID_MODEL');
    assert.match(err.message, pattern);
    return true;
  });
}

function decodeModel(bytes: Uint8Array): onnxProto.onnx.ModelProto {
  return onnx.ModelProto.decode(bytes);
}

/** Returns the decoded graph, typed as the class instead of the optional interface. */
function graphOf(model: onnxProto.onnx.ModelProto): onnxProto.onnx.GraphProto {
  assert.ok(model.graph instanceof onnx.GraphProto, 'model has no graph');
  return model.graph;
}

function encodeModel(model: onnxProto.onnx.ModelProto): Uint8Array {
  return onnx.ModelProto.encode(model).finish();
}

let images: Float32Array;
let labels: Int32Array;
let randomModelWeights: WeightMap;
let trainedWeights: WeightMap;

before(async () => {
  await tf.setBackend('wasm');
  const dataDir = resolveDataDir();
  const test = await loadLabelledImages(dataDir, {
    split: 'test',
    limit: IMAGE_COUNT,
  });
  assert.equal(test.count, IMAGE_COUNT);
  images = test.images;
  labels = test.labels;
  randomModelWeights = randomWeights(1234, 4);

  const train = await loadLabelledImages(dataDir, {
    split: 'train',
    limit: 2000,
  });
  trainedWeights = trainDenseLayers(
    randomWeights(99),
    train.images,
    train.labels,
  );
});

describe('exportOnnx', () => {
  // The trained case must beat chance (1/43) clearly, or it is not trained.
  const cases = [
    { label: 'random', weights: () => randomModelWeights, minAccuracy: 0 },
    { label: 'trained', weights: () => trainedWeights, minAccuracy: 0.2 },
  ];
  for (const { label, weights, minAccuracy } of cases) {
    test(`${label} weights match tfjs`, async (t) => {
      const model = exportOnnx(weights());

      const actual = await onnxProbabilities(model, images, IMAGE_COUNT);
      const expected = tfjsProbabilities(weights(), images, IMAGE_COUNT);

      const diff = maxAbsDiff(actual, expected);
      const expectedTop = topClasses(expected);
      const accuracy =
        expectedTop.filter((c, i) => c === labels[i]).length / IMAGE_COUNT;
      const meanTop = meanTopProbability(expected);
      t.diagnostic(
        `max abs diff ${diff.toExponential(2)}, mean top probability ` +
          `${meanTop.toFixed(3)}, tfjs accuracy ${accuracy.toFixed(3)}`,
      );
      assert.ok(diff <= TOLERANCE, `max abs diff ${diff} exceeds ${TOLERANCE}`);
      assert.deepEqual(topClasses(actual), expectedTop);
      assert.ok(meanTop > 0.3, `softmax is nearly flat: mean top ${meanTop}`);
      assert.ok(
        accuracy >= minAccuracy,
        `accuracy ${accuracy} < ${minAccuracy}`,
      );
    });
  }

  test('writes header and input shape', () => {
    const model = decodeModel(
      exportOnnx(randomModelWeights, { docString: 'round 3' }),
    );

    assert.equal(Number(model.irVersion), 8);
    assert.equal(model.opsetImport.length, 1);
    assert.equal(Number(model.opsetImport[0].version), 13);
    assert.equal(model.producerName, 'fleetlearn');
    assert.equal(model.docString, 'round 3');
    const input = graphOf(model).input[0];
    assert.equal(input.name, 'image');
    const dims = input.type!.tensorType!.shape!.dim!;
    assert.deepEqual(
      dims.map((dim) => dim.dimParam || Number(dim.dimValue)),
      ['batch', 32, 32, 3],
    );
    assert.equal(graphOf(model).output[0].name, 'probabilities');
  });

  test('export is deterministic', () => {
    assert.deepEqual(
      exportOnnx(randomModelWeights),
      exportOnnx(randomModelWeights),
    );
  });

  const python = findPythonWithOnnx();
  test(
    'onnx checker accepts models',
    {
      skip:
        python === undefined
          ? 'python3 module onnx missing (Debian python3-onnx)'
          : false,
    },
    (t) => {
      const dir = mkdtempSync(join(tmpdir(), 'fleetlearn-onnx-'));
      t.after(() => rmSync(dir, { recursive: true, force: true }));
      const models = {
        'classifier.onnx': exportOnnx(trainedWeights),
        'features-dense1.onnx': exportFeatureExtractor(
          trainedWeights,
          'dense1',
        ),
        'features-conv1.onnx': exportFeatureExtractor(trainedWeights, 'conv1'),
      };

      for (const [file, bytes] of Object.entries(models)) {
        const path = join(dir, file);
        writeFileSync(path, bytes);
        const result = spawnSync(python!, ['-c', CHECK_SCRIPT, path], {
          encoding: 'utf8',
        });

        assert.equal(result.status, 0, `${file}: ${result.stderr}`);
        assert.equal(result.stdout.trim(), '8 13');
      }
    },
  );

  test('rejects missing tensor', () => {
    const weights = new Map(randomModelWeights);
    weights.delete('conv2/bias');

    assertInvalidModel(() => exportOnnx(weights), /conv2\/bias/);
  });

  test('rejects NaN weight', () => {
    const kernel = randomModelWeights.get('dense1/kernel')!.slice();
    kernel[77] = NaN;
    const weights = new Map(randomModelWeights).set('dense1/kernel', kernel);

    assertInvalidModel(() => exportOnnx(weights), /dense1\/kernel.*NaN/);
  });

  test('rejects wrong element count', () => {
    const weights = new Map(randomModelWeights).set(
      'conv1/kernel',
      new Float32Array(431),
    );

    assertInvalidModel(() => exportOnnx(weights), /conv1\/kernel.*431/);
  });

  test('rejects unknown tensor', () => {
    const weights = new Map(randomModelWeights).set(
      'conv4/kernel',
      new Float32Array(1),
    );

    assertInvalidModel(() => exportOnnx(weights), /conv4\/kernel/);
  });
});

describe('exportFeatureExtractor', () => {
  const expectedSizes: Record<string, number> = {
    conv1: 32 * 32 * 3,
    conv2: 16 * 16 * 16,
    conv3: 8 * 8 * 32,
    dense1: 1024,
    dense2: 128,
  };

  for (const [layer, size] of Object.entries(expectedSizes)) {
    test(`features before ${layer} match`, async () => {
      const extractor = await OnnxFeatureExtractor.create(
        exportFeatureExtractor(trainedWeights, layer),
      );

      const actual = await extractor.extract(images, IMAGE_COUNT);
      await extractor.close();
      const expected = tfjsFeatures(trainedWeights, images, IMAGE_COUNT, layer);

      assert.equal(extractor.featureSize, size);
      assert.equal(actual.length, IMAGE_COUNT * size);
      const diff = maxAbsDiff(actual, expected);
      assert.ok(diff <= TOLERANCE, `max abs diff ${diff} exceeds ${TOLERANCE}`);
    });
  }

  test('needs only prefix tensors', async () => {
    const prefix = new Map(
      [...trainedWeights].filter(([name]) => name.startsWith('conv')),
    );

    const model = exportFeatureExtractor(prefix, 'dense1');

    assert.equal(graphOf(decodeModel(model)).initializer.length, 6);
  });

  test('rejects unknown layer', () => {
    assert.throws(
      () => exportFeatureExtractor(trainedWeights, 'conv9'),
      RangeError,
    );
  });

  test('rejects missing prefix tensor', () => {
    const weights = new Map(trainedWeights);
    weights.delete('conv3/kernel');

    assertInvalidModel(
      () => exportFeatureExtractor(weights, 'dense1'),
      /conv3\/kernel/,
    );
  });
});

describe('importOnnxWeights', () => {
  test('round trip is bit exact', () => {
    const imported = importOnnxWeights(exportOnnx(trainedWeights));

    assert.deepEqual(
      [...imported.keys()],
      TENSOR_SPECS.map((spec) => spec.name),
    );
    for (const [name, values] of trainedWeights) {
      const actual = imported.get(name)!;
      assert.ok(actual instanceof Float32Array, name);
      assert.deepEqual(
        new Uint32Array(actual.buffer, actual.byteOffset, actual.length),
        new Uint32Array(values.buffer, values.byteOffset, values.length),
        name,
      );
    }
  });

  test('reads unaligned input bytes', () => {
    const model = exportOnnx(trainedWeights);
    const shifted = new Uint8Array(model.length + 1).subarray(1);
    shifted.set(model);

    const imported = importOnnxWeights(shifted);

    assert.deepEqual(
      imported.get('dense2/kernel'),
      trainedWeights.get('dense2/kernel'),
    );
  });

  test('rejects garbage bytes', () => {
    let state = 7;
    const garbage = Uint8Array.from({ length: 4096 }, () => {
      state = (state * 1103515245 + 12345) >>> 0;
      return state >>> 24;
    });

    assertInvalidModel(() => importOnnxWeights(garbage), /ONNX/);
    assertInvalidModel(() => importOnnxWeights(new Uint8Array(0)), /producer/);
    assertInvalidModel(
      () => importOnnxWeights(new TextEncoder().encode('not a model')),
      /ONNX/,
    );
  });

  test('rejects missing initializer', () => {
    const model = decodeModel(exportOnnx(trainedWeights));
    graphOf(model).initializer = graphOf(model).initializer.filter(
      (tensor) => tensor.name !== 'dense1/bias',
    );

    assertInvalidModel(
      () => importOnnxWeights(encodeModel(model)),
      /dense1\/bias/,
    );
  });

  test('rejects wrong initializer shape', () => {
    const model = decodeModel(exportOnnx(trainedWeights));
    const kernel = graphOf(model).initializer.find(
      (tensor) => tensor.name === 'conv1/kernel',
    )!;
    // TF.js order instead of ONNX order: same element count, wrong layout.
    kernel.dims = [3, 3, 3, 16];

    assertInvalidModel(
      () => importOnnxWeights(encodeModel(model)),
      /conv1\/kernel.*shape/,
    );
  });

  test('rejects changed softmax axis', () => {
    const model = decodeModel(exportOnnx(trainedWeights));
    const softmax = graphOf(model).node.find(
      (node) => node.opType === 'Softmax',
    )!;
    softmax.attribute![0].i = -1;

    assertInvalidModel(() => importOnnxWeights(encodeModel(model)), /Softmax/);
  });

  test('rejects feature extractor model', () => {
    const model = exportFeatureExtractor(trainedWeights, 'dense2');

    assertInvalidModel(() => importOnnxWeights(model), /features/);
  });
});

after(() => {
  tf.disposeVariables();
});
