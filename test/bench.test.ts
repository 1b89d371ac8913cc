import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ?? path.join(REPO_ROOT, '../shared/data/gtsrb32');
const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-bench-test-'));

after(() => rmSync(workDir, { recursive: true, force: true }));

function runBench(args: string[]) {
  return spawnSync(
    process.execPath,
    ['--import', 'tsx', path.join(REPO_ROOT, 'scripts/bench.ts'), ...args],
    { cwd: REPO_ROOT, encoding: 'utf8', timeout: 120_000 },
  );
}

describe('bench command', () => {
  const jsonPath = path.join(workDir, 'bench.json');
  const result = runBench(['--quick', '--data', DATA_DIR, '--json', jsonPath]);

  test('quick run exits 0 with a table', () => {
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stdout, /machine: .+, \d+ cores/);
    assert.match(result.stdout, /command: npm run bench -- --quick/);
    assert.match(result.stdout, /copy \(TypedArray\.set\)/);
    assert.match(result.stdout, /% of copy/);
    assert.match(result.stdout, /bytes on the wire per round/);
  });

  test('quick run writes every part as JSON', () => {
    const report = JSON.parse(readFileSync(jsonPath, 'utf8'));

    assert.deepEqual(report.errors, {});
    assert.equal(report.kernel.kernel, 'wasm-simd');
    assert.equal(report.kernel.updates, 10);
    assert.ok(report.kernel.copyGBps > 0);
    assert.ok(report.kernel.addToCopyRatio > 0);
    assert.ok(report.kernel.addToCopyRatio < 10);
    if (typeof report.numpy === 'string') {
      assert.equal(report.numpy, 'numpy not present, skipped');
    } else {
      assert.equal(report.numpy.updates, 10);
      assert.equal(report.numpy.size, 100_000);
      assert.ok(report.numpy.secondsBest > 0);
    }
    assert.ok(report.codec.updateBytes > 500_000);
    assert.equal(report.codec.tensors, 4);
    assert.ok(report.inference.top1Agreement >= 0.95);
    assert.ok(report.inference.maxAbsProbabilityDifference < 1e-3);
    assert.equal(report.fleetRound.vehicles, 3);
    assert.equal(report.fleetRound.accepted, 3);
    assert.ok(report.fleetRound.uplinkBytes >= 3 * report.codec.updateBytes);
    assert.ok(report.fleetRound.downlinkBytes > 0);
  });

  test('zero vehicles rejected', () => {
    const rejected = runBench(['--quick', '--vehicles', '0']);

    assert.notEqual(rejected.status, 0);
    assert.match(rejected.stderr, /--vehicles <count>.*'0' is invalid/);
  });
});
