import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
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
    assert.ok(['native', 'wasm-simd'].includes(report.kernel.kernel));
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

/** Asserts the bench stopped before measuring, with one error line. */
function assertRejectedAtStart(
  result: ReturnType<typeof runBench>,
  pattern: RegExp,
): void {
  assert.equal(result.status, 1, result.stderr);
  const lines = result.stderr.trim().split('\n');
  assert.equal(lines.length, 1, result.stderr);
  assert.match(lines[0], pattern);
  assert.equal(result.stdout, '');
}

/**
 * Runs the quick bench and deletes `folder` once the first part starts,
 * after the start checks passed.
 */
function runBenchDeletingFolder(args: string[], folder: string) {
  return new Promise<{ status: number | null; stdout: string; stderr: string }>(
    (resolve, reject) => {
      const child = spawn(
        process.execPath,
        ['--import', 'tsx', path.join(REPO_ROOT, 'scripts/bench.ts'), ...args],
        { cwd: REPO_ROOT, timeout: 120_000 },
      );
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (chunk: Buffer) => (stdout += chunk));
      child.stderr.on('data', (chunk: Buffer) => {
        stderr += chunk;
        if (stderr.includes('bench: kernel') && existsSync(folder)) {
          rmSync(folder, { recursive: true, force: true });
        }
      });
      child.on('error', reject);
      child.on('close', (status) => resolve({ status, stdout, stderr }));
    },
  );
}

describe('bench start checks', () => {
  test('missing data folder rejected', () => {
    const result = runBench(['--quick', '--data', '/nonexistent']);

    assertRejectedAtStart(
      result,
      /^bench: no data directory found; looked in \/nonexistent /,
    );
  });

  test('data folder without images rejected', () => {
    const empty = path.join(workDir, 'empty-data');
    mkdirSync(empty);

    const result = runBench(['--quick', '--data', empty]);

    assertRejectedAtStart(result, /^bench: no images in .*empty-data/);
  });

  test('unwritable JSON folder rejected', () => {
    const result = runBench(['--quick', '--json', '/proc/bench.json']);

    assertRejectedAtStart(
      result,
      /^bench: cannot write the JSON report \/proc\/bench\.json: folder \/proc is not writable/,
    );
  });

  test('missing JSON folder rejected', () => {
    const json = path.join(workDir, 'absent', 'bench.json');

    const result = runBench(['--quick', '--data', DATA_DIR, '--json', json]);

    assertRejectedAtStart(result, /folder .*absent does not exist$/);
  });

  test('empty JSON path rejected', () => {
    const result = runBench(['--quick', '--json', '']);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /--json <file>.*expected a file path, got ""/);
    assert.equal(result.stdout, '');
  });

  test('JSON path through a file rejected', () => {
    const file = path.join(workDir, 'plain-file');
    writeFileSync(file, 'x');

    const result = runBench(['--json', path.join(file, 'bench.json')]);

    assertRejectedAtStart(result, /plain-file is not a folder$/);
  });

  test('failed JSON write keeps the table', async () => {
    const folder = path.join(workDir, 'removed-during-run');
    mkdirSync(folder);
    const json = path.join(folder, 'bench.json');

    const result = await runBenchDeletingFolder(
      ['--quick', '--data', DATA_DIR, '--json', json],
      folder,
    );

    assert.equal(result.status, 1, result.stderr);
    assert.match(result.stdout, /bytes on the wire per round/);
    const lastLine = result.stderr.trim().split('\n').at(-1);
    assert.match(
      lastLine!,
      /^bench: cannot write the JSON report .*bench\.json: ENOENT/,
    );
  });
});
