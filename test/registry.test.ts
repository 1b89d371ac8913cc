import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import {
  ModelStore,
  ReleaseSigner,
  resolveOptions,
  saveState,
  type ResolvedOptions,
  type StoredModel,
} from '../aggregator/index.ts';
import { encodeRelease } from '../aggregator/release-messages.ts';
import { buildNextVersion, loadCurrentModel } from '../aggregator/versions.ts';
import { MODEL_NAME, type WeightMap } from '../models/architecture.ts';
import {
  createRandom,
  loadLabelledImages,
  resolveDataDir,
  sha256Hex,
} from '../models/index.ts';
import {
  ModelRegistry,
  applyPrune,
  checkOnnx,
  compareVersions,
  exportVersion,
  formatVersions,
  planPrune,
  quantile,
  readWeights,
  tensorChanges,
} from '../models/registry/index.ts';
import {
  ErrorCode,
  createLogger,
  isFleetError,
  readPublicKeys,
  type ErrorCode as ErrorCodeType,
} from '../protocol/index.ts';
import { createKeyFolder, type KeyFolder } from './signing-fixtures.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const BASE_WEIGHTS = path.join(
  REPO_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
const log = createLogger({ level: 'silent' });
/** dense2/bias of version 1 moves by this much at class 14. */
const V1_BIAS_SHIFT = 0.5;

function fleetError(code: ErrorCodeType, pattern?: RegExp) {
  return (err: unknown): boolean =>
    isFleetError(err, code) &&
    (pattern === undefined || pattern.test(err.message));
}

/** Returns a delta that shifts one bias and adds seeded noise to dense1/kernel. */
function deltaOf(parent: WeightMap, seed: number, noise: number): WeightMap {
  const random = createRandom(seed);
  const kernel = parent
    .get('dense1/kernel')!
    .map(() => (random() - 0.5) * noise);
  const bias = new Float32Array(parent.get('dense2/bias')!.length);
  bias[14] = seed === 1 ? V1_BIAS_SHIFT : 0.1;
  return new Map([
    ['dense1/kernel', kernel],
    ['dense2/bias', bias],
  ]);
}

/**
 * Model store of a real aggregator history, built with the aggregator's
 * own version code on real test images:
 *
 *   v0 -> v1 -> v2 -> v3 (withdrawn by a rollback to v2)
 *               v2 -> v4 -> v5 -> v6 (current, signed)
 *
 * v1's manifest is rewritten without the fields older aggregators lacked.
 */
interface History {
  stateDir: string;
  options: ResolvedOptions;
  store: ModelStore;
  keys: KeyFolder;
  trustedKeysPath: string;
  otherKeysPath: string;
}

async function buildHistory(root: string): Promise<History> {
  const dataDir = resolveDataDir();
  const probe = await loadLabelledImages(dataDir, { split: 'test', limit: 8 });
  const testSplit = await loadLabelledImages(dataDir, {
    split: 'test',
    limit: 200,
  });
  const stateDir = path.join(root, 'state');
  const options = resolveOptions({
    fleetId: 'registry-test',
    brokerUrl: 'mqtt://127.0.0.1:1883',
    stateDir,
    baseWeightsPath: BASE_WEIGHTS,
    probeImages: probe.images,
    probeCount: probe.count,
    testSet: { images: testSplit.images, labels: testSplit.labels },
    aggregation: 'trimmed-mean',
    byzantineCount: 1,
    log,
  });
  const store = new ModelStore(stateDir, MODEL_NAME);
  const models = new Map<number, StoredModel>();
  models.set(0, (await loadCurrentModel(options, store, log)).model);

  const commit = async (version: number, parent: number, round: number) => {
    const base = models.get(parent)!;
    const { model } = await buildNextVersion(
      base,
      version,
      deltaOf(base.weights, version, version === 3 ? 0.5 : 0.01),
      {
        round,
        baseModelVersion: parent,
        selected: ['veh-1', 'veh-2', 'veh-3'],
        accepted: 3,
        rejected: 0,
        rejectedByReason: {},
        uplinkBytes: 0,
        numExamples: 300 + version,
        numVehicles: 3,
        durationMs: 10,
      },
      options,
    );
    store.save(model);
    saveState(stateDir, { round, modelVersion: version });
    models.set(version, model);
  };
  await commit(1, 0, 1);
  await commit(2, 1, 2);
  await commit(3, 2, 3);
  saveState(stateDir, { round: 3, modelVersion: 2 }); // the rollback
  await commit(4, 2, 4);
  await commit(5, 4, 5);
  await commit(6, 5, 6);

  const keys = createKeyFolder();
  const releaseKey = keys.createKey('release');
  const signer = new ReleaseSigner(releaseKey.signer, stateDir, log);
  const v6 = models.get(6)!;
  const { release } = encodeRelease(v6.manifest, v6.onnx, MAX_MESSAGE_BYTES);
  store.saveSignedRelease(6, signer.sign(release, MAX_MESSAGE_BYTES).notice);

  const v1Path = store.pathOf(1, 'json');
  const v1 = JSON.parse(readFileSync(v1Path, 'utf8'));
  delete v1.strategy;
  delete v1.strategyParams;
  delete v1.latency;
  writeFileSync(v1Path, `${JSON.stringify(v1, null, 2)}\n`);

  writeFileSync(
    path.join(stateDir, 'releases.json'),
    JSON.stringify({
      retained: [
        { version: 5, chunkCount: 1 },
        { version: 6, chunkCount: 1 },
      ],
    }),
  );
  return {
    stateDir,
    options,
    store,
    keys,
    trustedKeysPath: keys.writePublicKeys('trusted.json', [releaseKey]),
    otherKeysPath: keys.writePublicKeys('other.json', [keys.createKey('x')]),
  };
}

let root: string;
let history: History;
let registry: ModelRegistry;

/** Copies the state directory for a test that changes it. */
function copyState(name: string): string {
  const copy = path.join(root, name);
  cpSync(history.stateDir, copy, { recursive: true, preserveTimestamps: true });
  return copy;
}

/** Sets the state.json and manifest times the in-progress rule reads. */
function dateFiles(stateDir: string, extraVersion?: number): void {
  const stateMs = Date.now() / 1000;
  utimesSync(path.join(stateDir, 'state.json'), stateMs, stateMs);
  const dir = path.join(stateDir, 'models', MODEL_NAME);
  for (const version of [0, 1, 2, 3, 4, 5, 6]) {
    const time = stateMs - 100 + version;
    utimesSync(path.join(dir, `v${version}.json`), time, time);
  }
  if (extraVersion !== undefined) {
    const file = path.join(dir, `v${extraVersion}.json`);
    utimesSync(file, stateMs + 10, stateMs + 10);
  }
}

before(async () => {
  root = mkdtempSync(path.join(tmpdir(), 'fleetlearn-registry-'));
  history = await buildHistory(root);
  registry = ModelRegistry.open(history.stateDir, MODEL_NAME);
});

after(() => {
  history?.keys.remove();
  if (root !== undefined) rmSync(root, { recursive: true, force: true });
});

describe('manifest fields', () => {
  test('new version records strategy and latency', () => {
    const manifest = registry.manifest(5);

    assert.equal(manifest.strategy, 'trimmed-mean');
    assert.deepEqual(manifest.strategyParams, {
      byzantineCount: 1,
      trimFraction: 0.2,
    });
    assert.equal(manifest.numVehicles, 3);
    assert.equal(manifest.numExamples, 305);
    assert.equal(manifest.parentVersion, 4);
    assert.ok(manifest.latency !== null);
    assert.equal(manifest.latency.imageSource, 'test');
    assert.equal(manifest.latency.imageCount, 32);
    assert.equal(manifest.latency.runs, 64);
    assert.ok(manifest.latency.p50Ms > 0);
    assert.ok(manifest.latency.p95Ms >= manifest.latency.p50Ms);
    assert.notEqual(manifest.testAccuracy, null);
    assert.ok(manifest.testAccuracy! > 0.5);
  });

  test('base version strategy is base', () => {
    const manifest = registry.manifest(0);

    assert.equal(manifest.strategy, 'base');
    assert.equal(manifest.parentVersion, 0);
    assert.ok(manifest.latency !== null);
  });

  test('old manifest reads as unknown', () => {
    const manifest = registry.manifest(1);

    assert.equal(manifest.strategy, null);
    assert.equal(manifest.strategyParams, null);
    assert.equal(manifest.latency, null);
    assert.equal(manifest.numVehicles, 3);
  });

  test('aggregator still loads old manifest', () => {
    const model = history.store.load(1);

    assert.equal(model.manifest.version, 1);
    assert.equal(model.manifest.strategy, undefined);
    assert.equal(sha256Hex(model.onnx), model.manifest.sha256);
  });

  test('manifest naming another version rejected', () => {
    const copy = copyState('renamed');
    const dir = path.join(copy, 'models', MODEL_NAME);
    cpSync(path.join(dir, 'v2.json'), path.join(dir, 'v9.json'));

    assert.throws(
      () => ModelRegistry.open(copy, MODEL_NAME).manifest(9),
      fleetError(ErrorCode.InvalidModel, /has version 2, expected 9/),
    );
  });
});

describe('ModelRegistry', () => {
  test('lists versions and current', () => {
    assert.deepEqual(registry.versions(), [0, 1, 2, 3, 4, 5, 6]);
    assert.equal(registry.currentVersion(), 6);
    assert.deepEqual(registry.lineage(6), [6, 5, 4, 2, 1, 0]);
    assert.deepEqual(registry.retainedReleaseVersions(), [5, 6]);
  });

  test('unknown version names stored ones', () => {
    assert.throws(
      () => registry.manifest(42),
      fleetError(
        ErrorCode.InvalidModel,
        /model version 42 is not stored .*\(stored versions: 0-6\)/,
      ),
    );
  });

  test('missing store is INVALID_CONFIG', () => {
    assert.throws(
      () => ModelRegistry.open(path.join(root, 'nowhere'), MODEL_NAME),
      fleetError(ErrorCode.InvalidConfig, /no model store at .*nowhere/),
    );
  });

  test('signature of signed version', () => {
    const signature = registry.signature(6);

    assert.ok(signature !== null);
    assert.equal(signature.signedVersion, 6);
    assert.equal(signature.signedSha256, registry.manifest(6).sha256);
    assert.equal(signature.signatureHex.length, 128);
    assert.ok(signature.releaseSequence > 0);
    assert.equal(registry.signature(5), null);
  });

  test('signature verifies with trusted key', () => {
    const keys = registry.verifySignature(
      6,
      readPublicKeys(history.trustedKeysPath),
    );

    assert.equal(keys.keyId, registry.signature(6)!.keyId);
  });

  test('signature from untrusted key rejected', () => {
    assert.throws(
      () => registry.verifySignature(6, readPublicKeys(history.otherKeysPath)),
      fleetError(ErrorCode.UnknownKey),
    );
    assert.throws(
      () =>
        registry.verifySignature(5, readPublicKeys(history.trustedKeysPath)),
      fleetError(ErrorCode.NotSigned),
    );
  });

  test('notice for other file rejected', () => {
    const copy = copyState('swapped-notice');
    const dir = path.join(copy, 'models', MODEL_NAME);
    cpSync(path.join(dir, 'v6.release.pb'), path.join(dir, 'v5.release.pb'));

    assert.throws(
      () =>
        ModelRegistry.open(copy, MODEL_NAME).verifySignature(
          5,
          readPublicKeys(history.trustedKeysPath),
        ),
      fleetError(ErrorCode.DigestMismatch, /names version 6/),
    );
  });

  test('pin and unpin', () => {
    const copy = ModelRegistry.open(copyState('pins'), MODEL_NAME);

    copy.pin(3, 'audit of round 3');

    assert.equal(copy.pins().get(3)?.reason, 'audit of round 3');
    copy.unpin(3);
    assert.equal(copy.pins().size, 0);
    assert.throws(
      () => copy.unpin(3),
      fleetError(ErrorCode.InvalidConfig, /version 3 is not pinned/),
    );
    assert.throws(() => copy.pin(11, 'x'), fleetError(ErrorCode.InvalidModel));
  });

  test('damaged pins file stops prune', () => {
    const copy = copyState('bad-pins');
    writeFileSync(path.join(copy, 'models', MODEL_NAME, 'pins.json'), '{');

    assert.throws(
      () => planPrune(ModelRegistry.open(copy, MODEL_NAME), 2),
      fleetError(ErrorCode.InvalidConfig, /pins\.json/),
    );
  });

  test('formatVersions joins ranges', () => {
    assert.equal(formatVersions([0, 1, 2, 5, 7, 8]), '0-2, 5, 7-8');
    assert.equal(formatVersions([]), 'none');
  });

  test('quantile uses nearest rank', () => {
    const values = Array.from({ length: 20 }, (_, i) => i + 1);

    assert.equal(quantile(values, 0.5), 10);
    assert.equal(quantile(values, 0.95), 19);
    assert.throws(() => quantile([], 0.5), RangeError);
  });
});

describe('compareVersions', () => {
  test('tensor changes match the delta', () => {
    const result = compareVersions(registry, 0, 1);

    const bias = result.tensors.find((t) => t.name === 'dense2/bias')!;
    assert.ok(Math.abs(bias.l2Norm - V1_BIAS_SHIFT) < 1e-6, `${bias.l2Norm}`);
    assert.ok(Math.abs(bias.maxAbsChange - V1_BIAS_SHIFT) < 1e-6);
    const conv = result.tensors.find((t) => t.name === 'conv1/kernel')!;
    assert.equal(conv.l2Norm, 0);
    assert.equal(conv.relativeChange, 0);
    assert.equal(result.relation, 'a-ancestor-of-b');
    const norms = result.tensors.map((t) => t.l2Norm ** 2);
    const total = Math.sqrt(norms.reduce((a, b) => a + b, 0));
    assert.ok(Math.abs(result.totalL2Norm - total) < 1e-9);
  });

  test('deltas are B minus A', () => {
    const a = registry.manifest(4);
    const b = registry.manifest(6);

    const result = compareVersions(registry, 4, 6);

    assert.equal(result.accuracyDelta, b.testAccuracy! - a.testAccuracy!);
    assert.equal(result.latencyP50DeltaMs, b.latency!.p50Ms - a.latency!.p50Ms);
    assert.equal(result.latencyP95DeltaMs, b.latency!.p95Ms - a.latency!.p95Ms);
    const fields = result.fields.map((diff) => diff.field);
    assert.ok(fields.includes('parentVersion'));
    assert.ok(fields.includes('sha256'));
    assert.ok(!fields.includes('strategy'));
  });

  test('withdrawn and current are unrelated', () => {
    assert.equal(compareVersions(registry, 3, 6).relation, 'unrelated');
    assert.equal(compareVersions(registry, 6, 2).relation, 'b-ancestor-of-a');
  });

  test('old manifest gives unknown deltas', () => {
    const result = compareVersions(registry, 1, 2);

    assert.equal(result.latencyP50DeltaMs, null);
    assert.equal(result.latencyP95DeltaMs, null);
    assert.notEqual(result.accuracyDelta, null);
  });

  test('mismatched tensors rejected', () => {
    const a = new Map([['w', new Float32Array(3)]]);

    assert.throws(
      () => tensorChanges(a, new Map([['w', new Float32Array(4)]])),
      fleetError(ErrorCode.InvalidModel, /tensor w has 3 values/),
    );
    assert.throws(
      () => tensorChanges(a, new Map([['v', new Float32Array(3)]])),
      fleetError(ErrorCode.InvalidModel, /exists in only one/),
    );
  });
});

describe('exportVersion', () => {
  test('writes ONNX manifest signature sums', () => {
    const out = path.join(root, 'exports', 'v6');

    const exported = exportVersion(registry, 6, out);

    assert.deepEqual(readdirSync(out).sort(), [
      'SHA256SUMS',
      `${MODEL_NAME}-v6.onnx`,
      'manifest.json',
      'release.pb',
    ]);
    assert.equal(exported.signed, true);
    const onnx = readFileSync(path.join(out, `${MODEL_NAME}-v6.onnx`));
    assert.equal(sha256Hex(onnx), registry.manifest(6).sha256);
    assert.deepEqual(
      readFileSync(path.join(out, 'manifest.json')),
      readFileSync(registry.pathOf(6, 'json')),
    );
    const sums = readFileSync(path.join(out, 'SHA256SUMS'), 'utf8')
      .trim()
      .split('\n');
    assert.equal(sums.length, 3);
    for (const line of sums) {
      const [digest, name] = line.split('  ');
      assert.equal(sha256Hex(readFileSync(path.join(out, name))), digest);
    }
  });

  test('refuses existing folder', () => {
    const out = path.join(root, 'exports', 'taken');
    mkdirSync(out, { recursive: true });

    assert.throws(
      () => exportVersion(registry, 5, out),
      fleetError(ErrorCode.InvalidConfig, /already exists/),
    );
    assert.deepEqual(readdirSync(out), []);
  });

  test('corrupt ONNX leaves nothing behind', () => {
    const copy = copyState('corrupt');
    const onnxPath = path.join(copy, 'models', MODEL_NAME, 'v5.onnx');
    const bytes = readFileSync(onnxPath);
    bytes[100] ^= 0xff;
    writeFileSync(onnxPath, bytes);
    const exportsDir = path.join(root, 'corrupt-exports');
    mkdirSync(exportsDir);

    assert.throws(
      () =>
        exportVersion(
          ModelRegistry.open(copy, MODEL_NAME),
          5,
          path.join(exportsDir, 'v5'),
        ),
      fleetError(ErrorCode.InvalidModel, /SHA-256/),
    );
    assert.deepEqual(readdirSync(exportsDir), []);
  });
});

describe('prune', () => {
  test('plan keeps what rollback needs', () => {
    const copy = copyState('plan');
    dateFiles(copy);
    const copyRegistry = ModelRegistry.open(copy, MODEL_NAME);
    copyRegistry.pin(1, 'first federated version');

    const plan = planPrune(copyRegistry, 3);

    assert.equal(plan.current, 6);
    assert.deepEqual(plan.remove, [2, 3]);
    assert.deepEqual(plan.keep, [
      { version: 0, reasons: ['base'] },
      { version: 1, reasons: ['pinned'] },
      { version: 4, reasons: ['lineage'] },
      { version: 5, reasons: ['lineage', 'retained-release'] },
      { version: 6, reasons: ['current', 'retained-release'] },
    ]);
  });

  test('deletes files manifest first', () => {
    const copy = copyState('apply');
    dateFiles(copy);
    const copyRegistry = ModelRegistry.open(copy, MODEL_NAME);

    const removed = applyPrune(copyRegistry, planPrune(copyRegistry, 1));

    assert.deepEqual(
      removed.map((entry) => entry.version),
      [1, 2, 3, 4],
    );
    assert.match(removed[0].files[0], /v1\.json$/);
    assert.equal(removed[0].files.length, 3);
    assert.ok(removed[0].bytes > 600_000);
    assert.deepEqual(copyRegistry.versions(), [0, 5, 6]);
    for (const kind of ['onnx', 'weights.pb', 'json'] as const) {
      assert.equal(existsSync(copyRegistry.pathOf(3, kind)), false);
    }
    const store = new ModelStore(copy, MODEL_NAME);
    assert.equal(store.load(6).manifest.version, 6);
  });

  test('version being committed is kept', () => {
    const copy = copyState('in-progress');
    const dir = path.join(copy, 'models', MODEL_NAME);
    for (const kind of ['json', 'onnx', 'weights.pb']) {
      cpSync(path.join(dir, `v6.${kind}`), path.join(dir, `v7.${kind}`));
    }
    const manifest = JSON.parse(
      readFileSync(path.join(dir, 'v7.json'), 'utf8'),
    );
    writeFileSync(
      path.join(dir, 'v7.json'),
      JSON.stringify({ ...manifest, version: 7, parentVersion: 6 }),
    );
    dateFiles(copy, 7);

    const plan = planPrune(ModelRegistry.open(copy, MODEL_NAME), 1);

    assert.ok(
      plan.keep.some(
        ({ version, reasons }) =>
          version === 7 && reasons.includes('in-progress'),
      ),
    );
    assert.ok(plan.remove.includes(3), 'withdrawn version 3 is removed');
  });

  test('keep below one rejected', () => {
    assert.throws(() => planPrune(registry, 0), {
      name: 'RangeError',
      message: /keep count is 0, expected an integer >= 1/,
    });
  });

  test('no state.json rejected', () => {
    const copy = copyState('no-state');
    rmSync(path.join(copy, 'state.json'));

    assert.throws(
      () => planPrune(ModelRegistry.open(copy, MODEL_NAME), 2),
      fleetError(ErrorCode.InvalidConfig, /no state\.json/),
    );
  });
});

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

function runRegistry(stateDir: string, args: string[]): CliResult {
  const result = spawnSync(
    process.execPath,
    [
      '--import',
      'tsx',
      'scripts/registry.ts',
      '--state-dir',
      stateDir,
      ...args,
    ],
    { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 },
  );
  return {
    status: result.status,
    stdout: result.stdout,
    stderr: result.stderr,
  };
}

describe('registry command', () => {
  test('list shows unknown for old manifest', () => {
    const result = runRegistry(history.stateDir, ['list']);

    assert.equal(result.status, 0, result.stderr);
    const rows = result.stdout.split('\n').filter((line) => /^│ \d/.test(line));
    assert.equal(rows.length, 7);
    assert.match(rows[1], /│ 1 +│ 0 +│ 1 +│ unknown +│ 3 /);
    assert.match(rows[6], /trimmed-mean.*current signed/);
  });

  test('list as JSON', () => {
    const result = runRegistry(history.stateDir, ['list', '--json']);

    assert.equal(result.status, 0, result.stderr);
    const entries = JSON.parse(result.stdout);
    assert.deepEqual(
      entries.map(
        (entry: { manifest: { version: number } }) => entry.manifest.version,
      ),
      [0, 1, 2, 3, 4, 5, 6],
    );
    assert.equal(entries[6].isCurrent, true);
  });

  test('show verifies signature', () => {
    const result = runRegistry(history.stateDir, [
      'show',
      '6',
      '--trusted-keys',
      history.trustedKeysPath,
    ]);

    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /^version +6 \(current\)$/m);
    assert.match(result.stdout, /^strategy +trimmed-mean \{/m);
    assert.match(result.stdout, /^latency +p50 [\d.]+ ms, p95 [\d.]+ ms/m);
    assert.match(result.stdout, /^signature +key [0-9a-f]{16}, .*, verified$/m);
  });

  test('show with wrong key fails', () => {
    const result = runRegistry(history.stateDir, [
      'show',
      '6',
      '--trusted-keys',
      history.otherKeysPath,
    ]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /not among the 1 keys this receiver trusts/);
  });

  test('compare prints deltas', () => {
    const result = runRegistry(history.stateDir, ['compare', '4', '6']);

    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /^versions 4 -> 6: a-ancestor-of-b$/m);
    assert.match(result.stdout, /│ dense1\/kernel +│ \d\.\d{3}e[-+]\d+ /);
    assert.match(result.stdout, /^accuracy +[+-]\d\.\d{4}$/m);
    assert.match(result.stdout, /^latency p50 +[+-][\d.]+ ms$/m);
  });

  test('export then refuse overwrite', () => {
    const out = path.join(root, 'cli-export');

    const first = runRegistry(history.stateDir, ['export', '5', '--out', out]);
    const second = runRegistry(history.stateDir, ['export', '5', '--out', out]);

    assert.equal(first.status, 0, first.stderr);
    assert.match(first.stdout, /no signed release notice kept/);
    assert.ok(existsSync(path.join(out, `${MODEL_NAME}-v5.onnx`)));
    assert.equal(second.status, 1);
    assert.match(second.stderr, /export folder .*cli-export already exists/);
  });

  test('prune dry run then delete', () => {
    const copy = copyState('cli-prune');
    const dryRun = runRegistry(copy, ['prune', '--keep', '2', '--dry-run']);

    const pruned = runRegistry(copy, ['prune', '--keep', '2']);

    assert.equal(dryRun.status, 0, dryRun.stderr);
    assert.match(dryRun.stdout, /^would delete v4$/m);
    assert.equal(pruned.status, 0, pruned.stderr);
    assert.match(pruned.stdout, /^keep +v6 \(current, retained-release\)$/m);
    assert.match(pruned.stdout, /^deleted v4 \(3 files\)$/m);
    assert.match(pruned.stdout, /^deleted 4 versions, \d+ bytes$/m);
    const left = ModelRegistry.open(copy, MODEL_NAME).versions();
    assert.deepEqual(left, [0, 5, 6]);
  });

  test('unknown version exits 1', () => {
    const result = runRegistry(history.stateDir, ['show', '99']);

    assert.equal(result.status, 1);
    assert.match(
      result.stderr,
      /^error: model version 99 is not stored .*\(stored versions: 0-6\)$/m,
    );
  });

  test('missing store exits 1', () => {
    const result = runRegistry(path.join(root, 'absent'), ['list']);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /^error: no model store at .*absent/m);
  });

  test('bad arguments rejected', () => {
    const version = runRegistry(history.stateDir, ['show', 'latest']);
    const keep = runRegistry(history.stateDir, ['prune', '--keep', '0']);
    const noOut = runRegistry(history.stateDir, ['export', '3']);
    const noKeep = runRegistry(history.stateDir, ['prune']);

    assert.equal(version.status, 1);
    assert.match(version.stderr, /expected an integer >= 0, got latest/);
    assert.equal(keep.status, 1);
    assert.match(keep.stderr, /--keep.*expected an integer >= 1, got 0/);
    assert.equal(noOut.status, 1);
    assert.match(noOut.stderr, /required option '--out <dir>'/);
    assert.equal(noKeep.status, 1);
    assert.match(noKeep.stderr, /required option '--keep <count>'/);
  });
});

/** Asserts a failed command printed one error line and no stack. */
function assertOneLineError(result: CliResult, pattern: RegExp): void {
  assert.equal(result.status, 1, result.stdout);
  const lines = result.stderr.trim().split('\n');
  assert.equal(lines.length, 1, result.stderr);
  assert.match(lines[0], /^error: /);
  assert.match(lines[0], pattern);
}

describe('export path errors', () => {
  test('unwritable folder named in one line', () => {
    const result = runRegistry(history.stateDir, [
      'export',
      '5',
      '--out',
      '/proc/fleetlearn-export',
    ]);

    assertOneLineError(
      result,
      /cannot create export folder \/proc\/fleetlearn-export in \/proc: ENOENT/,
    );
  });

  test('file in the path named', () => {
    const file = path.join(root, 'plain-file');
    writeFileSync(file, 'x');

    const result = runRegistry(history.stateDir, [
      'export',
      '5',
      '--out',
      path.join(file, 'sub'),
    ]);

    assertOneLineError(result, /plain-file is a file, not a folder/);
    assert.throws(
      () => exportVersion(registry, 5, path.join(file, 'a', 'b')),
      fleetError(ErrorCode.InvalidConfig, /plain-file is a file/),
    );
  });

  test('empty path rejected', () => {
    // An empty path resolves to the working directory, whose parent
    // would receive the temporary .partial folder.
    const parent = path.dirname(REPO_ROOT);
    const partials = () =>
      readdirSync(parent).filter((name) => name.endsWith('.partial'));
    const before = partials();

    const result = runRegistry(history.stateDir, ['export', '5', '--out', '']);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /--out <dir>.*expected a folder path/);
    for (const blank of ['', '  ']) {
      assert.throws(
        () => exportVersion(registry, 5, blank),
        fleetError(ErrorCode.InvalidConfig, /empty path/),
      );
    }
    assert.deepEqual(partials(), before);
  });
});

describe('damaged store', () => {
  /** Copies the history and writes `text` to its v1.json. */
  function withManifest(name: string, text: string): string {
    const copy = copyState(name);
    dateFiles(copy);
    const file = path.join(copy, 'models', MODEL_NAME, 'v1.json');
    writeFileSync(file, text);
    utimesSync(file, Date.now() / 1000 - 99, Date.now() / 1000 - 99);
    return copy;
  }
  let garbage: string;
  let empty: string;
  before(() => {
    garbage = withManifest('garbage-manifest', 'garb\nage');
    empty = withManifest('empty-manifest', '{}');
  });

  test('missing weights file named', () => {
    const copy = copyState('no-weights');
    rmSync(path.join(copy, 'models', MODEL_NAME, 'v1.weights.pb'));

    const result = runRegistry(copy, ['compare', '1', '2']);

    assertOneLineError(result, /no weights file .*v1\.weights\.pb$/);
    assert.throws(
      () => readWeights(ModelRegistry.open(copy, MODEL_NAME), 1),
      fleetError(ErrorCode.InvalidModel, /v1\.weights\.pb/),
    );
  });

  test('list marks the damaged version', () => {
    const listed = ModelRegistry.open(garbage, MODEL_NAME).list();

    assert.deepEqual(
      listed.map((entry) => entry.version),
      [0, 1, 2, 3, 4, 5, 6],
    );
    assert.equal(listed[1].manifest, null);
    assert.match(listed[1].damage!, /v1\.json is not valid JSON/);
    assert.doesNotMatch(listed[1].damage!, /\n/);
    assert.equal(listed[2].damage, null);
    assert.equal(listed[6].isCurrent, true);
  });

  test('damaged notice listed with file', () => {
    const copy = copyState('damaged-notice');
    const notice = path.join(copy, 'models', MODEL_NAME, 'v6.release.pb');
    writeFileSync(notice, Uint8Array.from([0x0f, 0xff, 0xff]));

    const listed = ModelRegistry.open(copy, MODEL_NAME).list();

    assert.match(
      listed[6].damage!,
      /^signed notice .*v6\.release\.pb does not decode: /,
    );
    assert.equal(listed[6].isCurrent, true);
    assert.equal(listed[5].damage, null);
  });

  test('list command shows the reason', () => {
    const result = runRegistry(empty, ['list']);

    assert.equal(result.status, 0, result.stderr);
    const rows = result.stdout.split('\n').filter((line) => /^│ \d/.test(line));
    assert.equal(rows.length, 7);
    assert.match(rows[1], /^│ 1 +│ damaged, see below/);
    assert.match(rows[2], /│ 2 +│ 1 +│ 2 +│ trimmed-mean/);
    assert.match(
      result.stdout,
      /^v1 damaged: manifest .*v1\.json has version none, expected 1/m,
    );
  });

  test('healthy versions still usable', () => {
    const out = path.join(root, 'damaged-exports', 'v2');

    const show = runRegistry(garbage, ['show', '2']);
    const compare = runRegistry(garbage, ['compare', '2', '4']);
    const exported = exportVersion(
      ModelRegistry.open(garbage, MODEL_NAME),
      2,
      out,
    );

    assert.equal(show.status, 0, show.stderr);
    assert.match(show.stdout, /^parent version +1$/m);
    assert.equal(compare.status, 0, compare.stderr);
    assert.match(compare.stdout, /^versions 2 -> 4: a-ancestor-of-b$/m);
    assert.ok(existsSync(path.join(out, `${MODEL_NAME}-v2.onnx`)));
    assert.equal(exported.version, 2);
  });

  test('lineage past damage is unknown', () => {
    const copy = ModelRegistry.open(garbage, MODEL_NAME);

    assert.deepEqual(copy.lineage(6), [6, 5, 4, 2, 1]);
    assert.equal(compareVersions(copy, 0, 2).relation, 'unknown');
    assert.equal(compareVersions(copy, 3, 6).relation, 'unrelated');
  });

  test('damaged version fails in one line', () => {
    for (const args of [
      ['show', '1'],
      ['compare', '1', '2'],
      ['export', '1', '--out', path.join(root, 'damaged-v1')],
    ]) {
      const result = runRegistry(garbage, args);

      assertOneLineError(result, /v1\.json is not valid JSON: .*garb age/);
    }
    assert.equal(existsSync(path.join(root, 'damaged-v1')), false);
  });

  test('prune deletes a damaged version it drops', () => {
    const copy = withManifest('prune-damaged', '{}');

    const result = runRegistry(copy, ['prune', '--keep', '3']);

    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /^damaged v1: manifest .*has version none/m);
    assert.match(result.stdout, /^deleted v1 \(3 files\)$/m);
    const left = ModelRegistry.open(copy, MODEL_NAME).versions();
    assert.deepEqual(left, [0, 4, 5, 6]);
  });

  test('prune keeping a damaged version refused', () => {
    const copy = withManifest('prune-refused', 'garb\nage');
    const copyRegistry = ModelRegistry.open(copy, MODEL_NAME);

    const result = runRegistry(copy, ['prune', '--keep', '5']);

    assertOneLineError(result, /prune deletes nothing .*: v1 \(manifest /);
    assert.deepEqual(copyRegistry.versions(), [0, 1, 2, 3, 4, 5, 6]);
    assert.throws(
      () => planPrune(copyRegistry, 5),
      fleetError(ErrorCode.InvalidModel, /damaged manifest: v1 /),
    );
  });

  test('show reports a truncated ONNX file', () => {
    const copy = copyState('truncated-onnx');
    const onnxPath = path.join(copy, 'models', MODEL_NAME, 'v5.onnx');
    writeFileSync(onnxPath, readFileSync(onnxPath).subarray(0, 1000));

    const damaged = runRegistry(copy, ['show', '5']);
    const healthy = runRegistry(copy, ['show', '4']);

    assertOneLineError(
      damaged,
      /v5\.onnx has SHA-256 [0-9a-f]{64} \(1000 bytes\)/,
    );
    assert.match(damaged.stdout, /^version +5$/m);
    assert.match(damaged.stdout, /^onnx file +damaged: .*\(1000 bytes\), but/m);
    assert.equal(healthy.status, 0, healthy.stderr);
    assert.match(healthy.stdout, /^onnx file +matches the manifest SHA-256$/m);
    const check = checkOnnx(ModelRegistry.open(copy, MODEL_NAME), 5);
    assert.match(
      check.problem!,
      /its manifest records [0-9a-f]{64} \(\d+ bytes\)/,
    );
  });
});
