import assert from 'node:assert/strict';
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';

import {
  MODEL_NAME,
  TENSOR_SPECS,
  type WeightMap,
} from '../models/architecture.ts';
import { createRandom } from '../models/dataset.ts';
import {
  readWeightsFile,
  readWeightsFileContents,
  writeWeightsFile,
} from '../models/weights-file.ts';
import {
  encodeFloat32Tensor,
  encodeModelWeights,
  ErrorCode,
  FleetError,
} from '../protocol/index.ts';

const META = { modelName: MODEL_NAME, version: 7 };

/** Seeded weights with awkward float values: -0, subnormals, extremes. */
function sampleWeights(seed: number): WeightMap {
  const random = createRandom(seed);
  const weights: WeightMap = new Map();
  for (const spec of TENSOR_SPECS) {
    const count = spec.shape.reduce((a, b) => a * b, 1);
    const values = new Float32Array(count);
    for (let i = 0; i < count; i++) values[i] = (random() - 0.5) * 0.2;
    values[0] = -0;
    values[1 % count] = 1.4e-45;
    values[2 % count] = -3.4028234e38;
    weights.set(spec.name, values);
  }
  return weights;
}

function bytesOf(values: Float32Array): Buffer {
  return Buffer.from(values.buffer, values.byteOffset, values.byteLength);
}

/** Encodes a ModelWeights message with `edit` applied to its tensors. */
function encodeEdited(
  edit: (tensors: ReturnType<typeof encodeFloat32Tensor>[]) => void,
  modelName = MODEL_NAME,
): Uint8Array {
  const weights = sampleWeights(1);
  const tensors = TENSOR_SPECS.map((spec) =>
    encodeFloat32Tensor(spec.name, spec.shape, weights.get(spec.name)!),
  );
  edit(tensors);
  return encodeModelWeights({ modelName, version: 0, tensors });
}

function assertInvalidModel(fn: () => unknown): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
    assert.equal(err.code, ErrorCode.InvalidModel);
    return true;
  });
}

describe('weights file', () => {
  let dir: string;

  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'fleetlearn-weights-'));
  });

  after(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  test('round trip is bit-exact', () => {
    const weights = sampleWeights(42);
    const path = join(dir, 'round-trip.pb');

    writeWeightsFile(path, weights, META);
    const contents = readWeightsFileContents(path);

    assert.equal(contents.modelName, MODEL_NAME);
    assert.equal(contents.version, 7);
    assert.deepEqual(
      [...contents.weights.keys()],
      TENSOR_SPECS.map((spec) => spec.name),
    );
    for (const [name, values] of weights) {
      const read = contents.weights.get(name)!;
      assert.ok(
        bytesOf(read).equals(bytesOf(values)),
        `tensor ${name} differs`,
      );
    }
  });

  test('overwrite replaces previous file', () => {
    const path = join(dir, 'overwrite.pb');
    writeWeightsFile(path, sampleWeights(1), META);

    writeWeightsFile(path, sampleWeights(2), { ...META, version: 8 });

    const read = readWeightsFile(path);
    const expected = sampleWeights(2).get('dense2/bias')!;
    assert.ok(bytesOf(read.get('dense2/bias')!).equals(bytesOf(expected)));
    assert.equal(readWeightsFileContents(path).version, 8);
  });

  test('tensors own separate buffers', () => {
    const path = join(dir, 'buffers.pb');
    writeWeightsFile(path, sampleWeights(3), META);

    const read = readWeightsFile(path);

    const buffers = new Set([...read.values()].map((values) => values.buffer));
    assert.equal(buffers.size, TENSOR_SPECS.length);
  });

  const corruptCases: Array<[string, () => Uint8Array]> = [
    ['garbage bytes', () => new Uint8Array([0xff, 0xff, 0xff, 0xff, 0x0f])],
    [
      'truncated file',
      () => {
        const bytes = encodeEdited(() => {});
        return bytes.subarray(0, bytes.length - 100);
      },
    ],
    ['wrong model name', () => encodeEdited(() => {}, 'other-model')],
    ['missing tensor', () => encodeEdited((tensors) => tensors.pop())],
    [
      'unknown tensor',
      () =>
        encodeEdited((tensors) =>
          tensors.push(
            encodeFloat32Tensor('dense3/bias', [2], new Float32Array(2)),
          ),
        ),
    ],
    [
      'duplicate tensor',
      () => encodeEdited((tensors) => tensors.push(tensors[0])),
    ],
    [
      'wrong shape',
      () =>
        encodeEdited((tensors) => {
          tensors[1] = encodeFloat32Tensor(
            'conv1/bias',
            [4, 4],
            new Float32Array(16),
          );
        }),
    ],
    [
      'byte count mismatch',
      () =>
        encodeEdited((tensors) => {
          tensors[1] = { ...tensors[1], data: tensors[1].data.subarray(4) };
        }),
    ],
    [
      'NaN value',
      () =>
        encodeEdited((tensors) => {
          const values = new Float32Array(16);
          values[3] = NaN;
          tensors[1] = encodeFloat32Tensor('conv1/bias', [16], values);
        }),
    ],
  ];
  for (const [name, makeBytes] of corruptCases) {
    test(`read rejects ${name}`, () => {
      const path = join(dir, `corrupt-${name.replaceAll(' ', '-')}.pb`);
      writeFileSync(path, makeBytes());

      assertInvalidModel(() => readWeightsFile(path));
    });
  }

  test('read of missing file throws ENOENT', () => {
    assert.throws(() => readWeightsFile(join(dir, 'absent.pb')), {
      code: 'ENOENT',
    });
  });

  test('failed rename leaves no file', () => {
    const parent = join(dir, 'failed-rename');
    const target = join(parent, 'model.pb');
    mkdirSync(target, { recursive: true });

    assert.throws(() => writeWeightsFile(target, sampleWeights(4), META), {
      code: 'EISDIR',
    });

    assert.deepEqual(readdirSync(parent), ['model.pb']);
    assert.deepEqual(readdirSync(target), []);
  });

  test('invalid weights leave old file', () => {
    const parent = join(dir, 'invalid-weights');
    mkdirSync(parent);
    const path = join(parent, 'model.pb');
    writeWeightsFile(path, sampleWeights(5), META);
    const before = readFileSync(path);
    const broken = sampleWeights(6);
    broken.delete('conv2/kernel');

    assertInvalidModel(() => writeWeightsFile(path, broken, META));

    assert.ok(readFileSync(path).equals(before));
    assert.deepEqual(readdirSync(parent), ['model.pb']);
  });

  test('write rejects non-finite value', () => {
    const weights = sampleWeights(7);
    weights.get('dense1/bias')![5] = Infinity;

    assertInvalidModel(() =>
      writeWeightsFile(join(dir, 'infinite.pb'), weights, META),
    );
  });

  test('write rejects bad meta', () => {
    const weights = sampleWeights(8);
    const path = join(dir, 'meta.pb');

    assert.throws(
      () => writeWeightsFile(path, weights, { modelName: '', version: 0 }),
      TypeError,
    );
    assert.throws(
      () => writeWeightsFile(path, weights, { ...META, version: -1 }),
      RangeError,
    );
    assert.throws(
      () => writeWeightsFile(path, weights, { ...META, version: 2 ** 32 }),
      RangeError,
    );
  });
});
