import assert from 'node:assert/strict';
import {
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';

import { MODEL_NAME, type WeightMap } from '../models/architecture.ts';
import { exportOnnx, sha256Hex } from '../models/index.ts';
import { initializeWeights } from '../models/weight-init.ts';
import { ErrorCode, FleetError, createLogger } from '../protocol/index.ts';
import {
  ModelDeployment,
  hashFrozenPrefix,
  readDeployedModel,
  verifyRelease,
} from '../vehicle-agent/index.ts';
import {
  buildChunkedRelease,
  type FetchedRelease,
} from './release-fixtures.ts';

const log = createLogger({ level: 'silent' });
const weights = initializeWeights(3);
const tempDirs: string[] = [];

function tempStateDir(): string {
  const dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-deploy-'));
  tempDirs.push(dir);
  return dir;
}

function withDenseShift(shift: number): WeightMap {
  const next: WeightMap = new Map();
  for (const [name, values] of weights) {
    const copy = Float32Array.from(values);
    if (name.startsWith('dense'))
      for (let i = 0; i < copy.length; i++) copy[i] += shift;
    next.set(name, copy);
  }
  return next;
}

function releaseOf(
  version: number,
  source: WeightMap = withDenseShift(version / 100),
): FetchedRelease {
  const onnx = exportOnnx(source);
  return { ...buildChunkedRelease(onnx, version).release, onnx };
}

function assertFleetError(err: unknown, code: string): true {
  assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
  assert.equal(err.code, code);
  return true;
}

after(() => {
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

describe('release verification', () => {
  test('accepts matching digest', () => {
    const release = releaseOf(1);

    assert.doesNotThrow(() => verifyRelease(release, release.onnx));
  });

  test('rejects flipped byte', () => {
    const release = releaseOf(1);
    const onnx = Uint8Array.from(release.onnx);
    onnx[100] ^= 1;

    assert.throws(
      () => verifyRelease(release, onnx),
      (err) => assertFleetError(err, ErrorCode.DigestMismatch),
    );
  });

  test('rejects wrong size', () => {
    const release = releaseOf(1);

    assert.throws(
      () =>
        verifyRelease(
          { ...release, sizeBytes: release.sizeBytes + 1 },
          release.onnx,
        ),
      (err) => assertFleetError(err, ErrorCode.DigestMismatch),
    );
  });
});

describe('model deployment', () => {
  test('keeps current and previous files', async () => {
    const stateDir = tempStateDir();
    const deployment = new ModelDeployment(stateDir, log);

    for (const version of [0, 1, 2])
      await deployment.deploy(releaseOf(version));
    const pointer = JSON.parse(
      readFileSync(path.join(stateDir, 'current.json'), 'utf8'),
    );
    await deployment.close();

    assert.equal(pointer.version, 2);
    assert.equal(pointer.previous.version, 1);
    assert.equal(existsSync(path.join(stateDir, 'models', 'v0.onnx')), false);
    assert.ok(existsSync(path.join(stateDir, 'models', 'v1.onnx')));
    assert.ok(existsSync(path.join(stateDir, 'models', 'v2.onnx')));
  });

  test('rollback serves previous version', async () => {
    const stateDir = tempStateDir();
    const deployment = new ModelDeployment(stateDir, log);
    await deployment.deploy(releaseOf(1));
    await deployment.deploy(releaseOf(2));

    const model = await deployment.rollback();
    const stored = await readDeployedModel(stateDir);
    const previous = deployment.previous?.version;
    await deployment.close();

    assert.equal(model.version, 1);
    assert.equal(previous, 2);
    assert.equal(stored.version, 1);
  });

  test('restore loads both versions', async () => {
    const stateDir = tempStateDir();
    const first = new ModelDeployment(stateDir, log);
    await first.deploy(releaseOf(3));
    await first.deploy(releaseOf(4));
    const image = new Float32Array(32 * 32 * 3).fill(0.5);
    const expected = await first.classify(image, 1);
    await first.close();

    const second = new ModelDeployment(stateDir, log);
    const restored = await second.restore();
    const probabilities = await second.classify(image, 1);
    const previous = second.previous?.version;
    await second.close();

    assert.equal(restored?.version, 4);
    assert.equal(previous, 3);
    assert.deepEqual(probabilities, expected);
  });

  test('restore skips damaged model file', async () => {
    const stateDir = tempStateDir();
    const first = new ModelDeployment(stateDir, log);
    await first.deploy(releaseOf(5));
    await first.close();
    const file = path.join(stateDir, 'models', 'v5.onnx');
    const bytes = readFileSync(file);
    bytes[bytes.length - 1] ^= 0xff;
    writeFileSync(file, bytes);

    const second = new ModelDeployment(stateDir, log);
    const restored = await second.restore();

    assert.equal(restored, undefined);
    await assert.rejects(readDeployedModel(stateDir), (err) =>
      assertFleetError(err, ErrorCode.InvalidModel),
    );
  });

  test('restore ignores corrupt pointer', async () => {
    const stateDir = tempStateDir();
    writeFileSync(path.join(stateDir, 'current.json'), '{"version":');

    const deployment = new ModelDeployment(stateDir, log);

    assert.equal(await deployment.restore(), undefined);
  });

  test('invalid onnx leaves deployment unchanged', async () => {
    const stateDir = tempStateDir();
    const deployment = new ModelDeployment(stateDir, log);
    await deployment.deploy(releaseOf(1));
    const junk = new Uint8Array([8, 1, 18, 3, 1, 2, 3]);

    await assert.rejects(
      deployment.deploy({
        modelName: MODEL_NAME,
        version: 2,
        sha256: sha256Hex(junk),
        onnx: junk,
      }),
      (err) => assertFleetError(err, ErrorCode.InvalidModel),
    );
    const current = deployment.current?.version;
    await deployment.close();

    assert.equal(current, 1);
    assert.equal(existsSync(path.join(stateDir, 'models', 'v2.onnx')), false);
  });

  test('classify without model fails', async () => {
    const deployment = new ModelDeployment(tempStateDir(), log);

    await assert.rejects(
      deployment.classify(new Float32Array(3072), 1),
      (err) => assertFleetError(err, ErrorCode.InvalidModel),
    );
  });
});

describe('frozen prefix hash', () => {
  test('ignores dense weight changes', () => {
    assert.equal(
      hashFrozenPrefix(weights, 'dense1'),
      hashFrozenPrefix(withDenseShift(0.5), 'dense1'),
    );
  });

  test('changes with conv weights', () => {
    const changed = new Map(weights);
    const kernel = Float32Array.from(weights.get('conv3/kernel')!);
    kernel[0] += 1e-3;
    changed.set('conv3/kernel', kernel);

    assert.notEqual(
      hashFrozenPrefix(weights, 'dense1'),
      hashFrozenPrefix(changed, 'dense1'),
    );
  });

  test('differs between layers', () => {
    assert.notEqual(
      hashFrozenPrefix(weights, 'dense1'),
      hashFrozenPrefix(weights, 'dense2'),
    );
  });
});
