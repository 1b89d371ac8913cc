import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';

import * as tf from '@tensorflow/tfjs';

import {
  NUM_CLASSES,
  TENSOR_SPECS,
  tensorNamesOfLayers,
  type WeightMap,
} from '../models/architecture.ts';
import {
  currentTrainingBackend,
  hasConvKernelGradient,
  selectTrainingBackend,
} from '../models/backend.ts';
import {
  loadLabelledImages,
  resolveDataDir,
  subset,
  type LabelledImages,
} from '../models/dataset.ts';
import { conv2dCustomGrad, conv2dIm2col } from '../models/forward.ts';
import { exportFeatureExtractor } from '../models/onnx-export.ts';
import { OnnxFeatureExtractor } from '../models/runtime.ts';
import {
  firstTrainableLayer,
  predictTfjs,
  trainLocal,
  type TrainLocalOptions,
} from '../models/training.ts';
import { initializeWeights } from '../models/weight-init.ts';

const HEAD = tensorNamesOfLayers(['dense1', 'dense2']);
const ALL = TENSOR_SPECS.map((spec) => spec.name);
const FEATURE_COUNT = 400;

const HEAD_OPTIONS: TrainLocalOptions = {
  trainableTensors: HEAD,
  epochs: 2,
  batchSize: 32,
  learningRate: 0.001,
  proximalMu: 0,
  seed: 3,
  fromLayer: 'dense1',
};

function l2Norm(deltas: WeightMap): number {
  let sum = 0;
  for (const values of deltas.values()) {
    for (const value of values) sum += value * value;
  }
  return Math.sqrt(sum);
}

function bytesOf(values: Float32Array): Buffer {
  return Buffer.from(values.buffer, values.byteOffset, values.byteLength);
}

describe('trainLocal', () => {
  let base: WeightMap;
  let images: LabelledImages;
  let features: Float32Array;
  let featureLabels: Int32Array;

  before(async () => {
    await selectTrainingBackend();
    base = initializeWeights(11);
    images = await loadLabelledImages(resolveDataDir(), {
      limit: FEATURE_COUNT,
    });
    const extractor = await OnnxFeatureExtractor.create(
      exportFeatureExtractor(base, 'dense1'),
    );
    features = await extractor.extract(images.images, images.count);
    featureLabels = images.labels;
    await extractor.close();
  });

  test('features path reduces loss', async () => {
    const options = { ...HEAD_OPTIONS, learningRate: 0.003 };
    const short = await trainLocal(base, features, featureLabels, {
      ...options,
      epochs: 1,
    });
    const long = await trainLocal(base, features, featureLabels, {
      ...options,
      epochs: 15,
    });

    assert.ok(
      long.loss < short.loss * 0.7,
      `loss ${long.loss} after 15 epochs, ${short.loss} after 1`,
    );
    assert.ok(long.accuracy > short.accuracy);
    assert.equal(long.numExamples, FEATURE_COUNT);
    assert.ok(long.durationMs > 0);
  });

  test('full path trains convolutions', async () => {
    const small = subset(
      images,
      Array.from({ length: 96 }, (_, i) => i * 4),
    );
    const options = {
      trainableTensors: ALL,
      batchSize: 16,
      learningRate: 0.003,
      proximalMu: 0,
      seed: 5,
    };

    const short = await trainLocal(base, small.images, small.labels, {
      ...options,
      epochs: 1,
    });
    const long = await trainLocal(base, small.images, small.labels, {
      ...options,
      epochs: 8,
    });

    assert.equal(currentTrainingBackend(), 'wasm');
    assert.equal(hasConvKernelGradient(), false);
    assert.ok(
      long.loss < short.loss * 0.7,
      `loss ${long.loss} after 8 epochs, ${short.loss} after 1`,
    );
    assert.ok(l2Norm(new Map([['k', long.deltas.get('conv1/kernel')!]])) > 0);
  });

  test('image input trains head only', async () => {
    const fromImages = await trainLocal(base, images.images, images.labels, {
      ...HEAD_OPTIONS,
      fromLayer: undefined,
    });
    const fromFeatures = await trainLocal(
      base,
      features,
      featureLabels,
      HEAD_OPTIONS,
    );

    assert.deepEqual([...fromImages.deltas.keys()], HEAD);
    // TF.js and onnxruntime features differ in the last bits only.
    const a = fromImages.deltas.get('dense2/bias')!;
    const b = fromFeatures.deltas.get('dense2/bias')!;
    const maxDiff = Math.max(...a.map((value, i) => Math.abs(value - b[i])));
    assert.ok(maxDiff < 1e-3, `max difference ${maxDiff}`);
  });

  test('deltas hold trainable tensors only', async () => {
    const trainable = ['dense2/kernel', 'dense1/bias'];

    const result = await trainLocal(base, features, featureLabels, {
      ...HEAD_OPTIONS,
      trainableTensors: trainable,
    });

    assert.deepEqual([...result.deltas.keys()].sort(), [...trainable].sort());
    for (const name of trainable) {
      assert.equal(result.deltas.get(name)!.length, base.get(name)!.length);
    }
    assert.ok(l2Norm(result.deltas) > 0);
  });

  test('large FedProx mu stays closer', async () => {
    const free = await trainLocal(base, features, featureLabels, HEAD_OPTIONS);
    const proximal = await trainLocal(base, features, featureLabels, {
      ...HEAD_OPTIONS,
      optimizer: 'sgd-momentum',
      learningRate: 0.01,
      proximalMu: 50,
    });
    const freeSgd = await trainLocal(base, features, featureLabels, {
      ...HEAD_OPTIONS,
      optimizer: 'sgd-momentum',
      learningRate: 0.01,
    });
    const proximalAdam = await trainLocal(base, features, featureLabels, {
      ...HEAD_OPTIONS,
      proximalMu: 50,
    });

    assert.ok(l2Norm(proximal.deltas) < l2Norm(freeSgd.deltas) * 0.5);
    assert.ok(l2Norm(proximalAdam.deltas) < l2Norm(free.deltas));
  });

  test('same seed reproduces deltas', async () => {
    const first = await trainLocal(base, features, featureLabels, HEAD_OPTIONS);
    const second = await trainLocal(
      base,
      features,
      featureLabels,
      HEAD_OPTIONS,
    );
    const other = await trainLocal(base, features, featureLabels, {
      ...HEAD_OPTIONS,
      seed: 4,
    });

    for (const name of HEAD) {
      const a = bytesOf(first.deltas.get(name)!);
      assert.ok(a.equals(bytesOf(second.deltas.get(name)!)), name);
    }
    assert.equal(first.loss, second.loss);
    const a = bytesOf(first.deltas.get('dense2/kernel')!);
    assert.ok(!a.equals(bytesOf(other.deltas.get('dense2/kernel')!)));
  });

  test('tensor count unchanged after training', async () => {
    const small = subset(
      images,
      Array.from({ length: 20 }, (_, i) => i),
    );
    const before = tf.memory().numTensors;

    await trainLocal(base, features, featureLabels, {
      ...HEAD_OPTIONS,
      proximalMu: 0.1,
    });
    await trainLocal(base, small.images, small.labels, {
      ...HEAD_OPTIONS,
      trainableTensors: ALL,
      fromLayer: undefined,
      epochs: 1,
    });
    await predictTfjs(base, small.images, small.count);

    assert.equal(tf.memory().numTensors, before);
  });

  test('restricted softmax spares absent classes', async () => {
    const local = Array.from({ length: FEATURE_COUNT }, (_, i) => i).filter(
      (i) => featureLabels[i] < 5,
    );
    const localFeatures = new Float32Array(local.length * 1024);
    local.forEach((example, row) =>
      localFeatures.set(
        features.subarray(example * 1024, (example + 1) * 1024),
        row * 1024,
      ),
    );
    const localLabels = Int32Array.from(local, (i) => featureLabels[i]);

    const restricted = await trainLocal(base, localFeatures, localLabels, {
      ...HEAD_OPTIONS,
      restrictToLocalClasses: true,
    });
    const plain = await trainLocal(base, localFeatures, localLabels, {
      ...HEAD_OPTIONS,
    });

    const restrictedBias = restricted.deltas.get('dense2/bias')!;
    const plainBias = plain.deltas.get('dense2/bias')!;
    assert.ok(local.length > 0);
    assert.ok(restrictedBias.subarray(0, 5).some((value) => value !== 0));
    assert.ok(restrictedBias.subarray(5).every((value) => value === 0));
    assert.ok(plainBias.subarray(5).some((value) => value !== 0));
  });

  test('training lets timers run', async () => {
    let ticks = 0;
    const timer = setInterval(() => ticks++, 5);

    const result = await trainLocal(base, features, featureLabels, {
      ...HEAD_OPTIONS,
      epochs: 10,
    });
    clearInterval(timer);

    const expected = Math.floor(result.durationMs / 100);
    assert.ok(ticks >= expected, `${ticks} ticks in ${result.durationMs} ms`);
  });

  test('mid-network fromLayer trains', async () => {
    const small = subset(
      images,
      Array.from({ length: 32 }, (_, i) => i),
    );
    const extractor = await OnnxFeatureExtractor.create(
      exportFeatureExtractor(base, 'conv2'),
    );
    const conv2Inputs = await extractor.extract(small.images, small.count);
    await extractor.close();

    const result = await trainLocal(base, conv2Inputs, small.labels, {
      ...HEAD_OPTIONS,
      trainableTensors: ['conv3/kernel', 'dense2/bias'],
      fromLayer: 'conv2',
      epochs: 1,
    });

    assert.deepEqual([...result.deltas.keys()].sort(), [
      'conv3/kernel',
      'dense2/bias',
    ]);
  });

  test('restricted softmax leaves absent classes', async () => {
    const twoClasses: number[] = [];
    for (let i = 0; i < featureLabels.length; i++) {
      if (featureLabels[i] <= 1) twoClasses.push(i);
    }
    const size = features.length / featureLabels.length;
    const inputs = new Float32Array(twoClasses.length * size);
    twoClasses.forEach((example, row) =>
      inputs.set(
        features.subarray(example * size, (example + 1) * size),
        row * size,
      ),
    );
    const labels = Int32Array.from(twoClasses, (i) => featureLabels[i]);

    const restricted = await trainLocal(base, inputs, labels, {
      ...HEAD_OPTIONS,
      restrictToLocalClasses: true,
    });
    const plain = await trainLocal(base, inputs, labels, HEAD_OPTIONS);

    const restrictedBias = restricted.deltas.get('dense2/bias')!;
    const plainBias = plain.deltas.get('dense2/bias')!;
    assert.ok(twoClasses.length > 0);
    assert.notEqual(restrictedBias[0], 0);
    for (let label = 2; label < NUM_CLASSES; label++) {
      assert.equal(restrictedBias[label], 0, `class ${label}`);
    }
    assert.ok(plainBias[5] < 0, `plain bias delta ${plainBias[5]}`);
  });
});

describe('trainLocal options', () => {
  let base: WeightMap;
  const features = new Float32Array(4 * 1024);
  const labels = new Int32Array([0, 1, 2, 42]);

  before(async () => {
    await selectTrainingBackend();
    base = initializeWeights(1);
  });

  const rangeCases: Array<[string, Partial<TrainLocalOptions>]> = [
    ['epochs zero', { epochs: 0 }],
    ['epochs fractional', { epochs: 1.5 }],
    ['batchSize zero', { batchSize: 0 }],
    ['learningRate zero', { learningRate: 0 }],
    ['learningRate NaN', { learningRate: NaN }],
    ['learningRate infinite', { learningRate: Infinity }],
    ['proximalMu negative', { proximalMu: -0.1 }],
    ['seed fractional', { seed: 0.5 }],
    ['unknown tensor', { trainableTensors: ['dense3/kernel'] }],
    ['empty trainable list', { trainableTensors: [] }],
    ['duplicate tensor', { trainableTensors: ['dense2/bias', 'dense2/bias'] }],
    ['unknown fromLayer', { fromLayer: 'dense9' }],
    [
      'fromLayer after trainable',
      { trainableTensors: ['dense1/kernel'], fromLayer: 'dense2' },
    ],
  ];
  for (const [name, override] of rangeCases) {
    test(`rejects ${name}`, async () => {
      await assert.rejects(
        trainLocal(base, features, labels, { ...HEAD_OPTIONS, ...override }),
        RangeError,
      );
    });
  }

  test('rejects label out of range', async () => {
    await assert.rejects(
      trainLocal(base, features, new Int32Array([0, 1, 2, 43]), HEAD_OPTIONS),
      (err: unknown) =>
        err instanceof RangeError && /labels\[3\] is 43/.test(err.message),
    );
  });

  test('rejects inputs length mismatch', async () => {
    await assert.rejects(
      trainLocal(base, new Float32Array(3 * 1024), labels, HEAD_OPTIONS),
      (err: unknown) =>
        err instanceof RangeError && /inputs has 3072 values/.test(err.message),
    );
  });

  test('rejects empty examples', async () => {
    await assert.rejects(
      trainLocal(base, new Float32Array(0), new Int32Array(0), HEAD_OPTIONS),
      RangeError,
    );
  });

  test('rejects wrong argument types', async () => {
    await assert.rejects(
      trainLocal(base, [0] as unknown as Float32Array, labels, HEAD_OPTIONS),
      TypeError,
    );
    await assert.rejects(
      trainLocal(base, features, [0, 1, 2, 3] as unknown as Int32Array, {
        ...HEAD_OPTIONS,
      }),
      TypeError,
    );
    await assert.rejects(
      trainLocal(base, features, labels, {
        ...HEAD_OPTIONS,
        epochs: '2' as unknown as number,
      }),
      TypeError,
    );
  });

  test('rejects missing base tensor', async () => {
    const partial = new Map(base);
    partial.delete('dense2/kernel');

    await assert.rejects(
      trainLocal(partial, features, labels, HEAD_OPTIONS),
      (err: unknown) =>
        err instanceof RangeError && /dense2\/kernel/.test(err.message),
    );
  });

  test('first trainable layer in model order', () => {
    assert.equal(firstTrainableLayer(['dense2/bias', 'conv2/kernel']), 'conv2');
    assert.equal(firstTrainableLayer(HEAD), 'dense1');
    assert.throws(() => firstTrainableLayer(['conv9/kernel']), RangeError);
    assert.throws(() => firstTrainableLayer([]), RangeError);
  });
});

describe('custom-grad convolution', () => {
  before(async () => {
    await selectTrainingBackend();
  });

  test('gradients match im2col', () => {
    const x = tf.randomNormal([3, 8, 8, 5], 0, 1, 'float32', 1);
    const kernel = tf.randomNormal([3, 3, 5, 7], 0, 1, 'float32', 2);
    const weights = tf.randomNormal([3, 8, 8, 7], 0, 1, 'float32', 3);
    const lossOf =
      (conv: typeof conv2dIm2col) => (input: tf.Tensor, k: tf.Tensor) =>
        tf.sum(tf.mul(conv(input as tf.Tensor4D, k as tf.Tensor4D), weights));

    const expected = tf.grads(lossOf(conv2dIm2col))([x, kernel]);
    const actual = tf.grads(lossOf((a, b) => conv2dCustomGrad(a, b)))([
      x,
      kernel,
    ]);
    const kernelOnly = tf.grad((k: tf.Tensor) =>
      lossOf((a, b) => conv2dCustomGrad(a, b, false))(x, k),
    )(kernel);

    for (const [index, tensor] of [...actual, kernelOnly].entries()) {
      const reference = expected[index === 2 ? 1 : index];
      const diff = tf.max(tf.abs(tf.sub(tensor, reference))).dataSync()[0];
      assert.ok(diff < 1e-4, `gradient ${index} differs by ${diff}`);
    }
    tf.dispose([x, kernel, weights, ...expected, ...actual, kernelOnly]);
  });
});

describe('predictTfjs', () => {
  test('probabilities sum to one', async () => {
    const data = await loadLabelledImages(resolveDataDir(), { limit: 300 });
    const weights = initializeWeights(2);

    const all = await predictTfjs(weights, data.images, data.count);
    const tail = await predictTfjs(
      weights,
      data.images.subarray(257 * 3072, 258 * 3072),
      1,
    );

    assert.equal(all.length, data.count * NUM_CLASSES);
    for (let i = 0; i < data.count; i += 37) {
      const row = all.subarray(i * NUM_CLASSES, (i + 1) * NUM_CLASSES);
      const sum = row.reduce((a, b) => a + b, 0);
      assert.ok(Math.abs(sum - 1) < 1e-5, `row ${i} sums to ${sum}`);
    }
    const row = all.subarray(257 * NUM_CLASSES, 258 * NUM_CLASSES);
    for (let j = 0; j < NUM_CLASSES; j++) {
      assert.ok(Math.abs(row[j] - tail[j]) < 1e-6);
    }
  });

  test('rejects wrong image count', async () => {
    await assert.rejects(
      predictTfjs(initializeWeights(1), new Float32Array(3072), 2),
      RangeError,
    );
  });
});

describe('selectTrainingBackend', () => {
  test('selects wasm here, idempotent', async () => {
    const first = await selectTrainingBackend();
    const second = await selectTrainingBackend(undefined, 'wasm');

    assert.equal(first, 'wasm');
    assert.equal(second, 'wasm');
    assert.equal(tf.getBackend(), 'wasm');
  });

  test('missing preferred backend fails clearly', async () => {
    await assert.rejects(
      selectTrainingBackend(undefined, 'tensorflow'),
      /training backend tensorflow failed to load from @tensorflow\/tfjs-node/,
    );

    assert.equal(currentTrainingBackend(), 'wasm');
    assert.equal(tf.getBackend(), 'wasm');
  });

  test('unknown backend name rejected', async () => {
    await assert.rejects(selectTrainingBackend(undefined, 'gpu'), RangeError);
  });
});
