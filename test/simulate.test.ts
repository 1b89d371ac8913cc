import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ?? path.join(REPO_ROOT, '../shared/data/gtsrb32');
const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-simulate-test-'));

after(() => rmSync(workDir, { recursive: true, force: true }));

function runSimulate(args: string[]) {
  return spawnSync(
    process.execPath,
    ['--import', 'tsx', path.join(REPO_ROOT, 'scripts/simulate.ts'), ...args],
    {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      timeout: 240_000,
      env: { ...process.env, FLEETLEARN_DATA: '' },
    },
  );
}

function findPythonWithOnnx(): string | undefined {
  return ['python3', '/usr/bin/python3'].find(
    (python) =>
      spawnSync(python, ['-c', 'import onnx'], { stdio: 'ignore' }).status ===
      0,
  );
}

describe('simulate command', () => {
  const reportPath = path.join(workDir, 'report.json');
  const stateDir = path.join(workDir, 'state');
  const result = runSimulate([
    '--vehicles',
    '3',
    '--rounds',
    '2',
    '--data',
    DATA_DIR,
    '--seed',
    '4',
    '--local-epochs',
    '1',
    '--state-dir',
    stateDir,
    '--report',
    reportPath,
    '--no-progress',
  ]);

  it('runs every round and exits 0', () => {
    assert.equal(result.status, 0, result.stderr);

    const report = JSON.parse(readFileSync(reportPath, 'utf8'));

    assert.equal(report.rounds.length, 2);
    for (const round of report.rounds) {
      assert.equal(round.accepted, 3, `round ${round.round}`);
      assert.equal(round.rejected, 0, `round ${round.round}`);
      assert.equal(round.sent, 3, `round ${round.round} sent`);
      assert.equal(round.delivered, 3, `round ${round.round} delivered`);
      assert.equal(round.duplicatesDropped, 0, `round ${round.round}`);
      assert.ok(round.uplinkBytes > 0);
      assert.ok(round.downlinkBytes > 0);
      assert.ok(round.durationMs > 0);
      assert.ok(round.accuracy > 0, `round ${round.round} accuracy`);
      assert.ok(round.accuracy <= 1, `round ${round.round} accuracy`);
    }
    assert.ok(report.baseAccuracy > 0.3, `base ${report.baseAccuracy}`);
    assert.ok(report.centralizedAccuracy > 0.3);
    assert.equal(report.finalAccuracy, report.rounds[1].accuracy);
    assert.equal(report.modelVersion, 2);
  });

  it('final ONNX agrees with TF.js', () => {
    const report = JSON.parse(readFileSync(reportPath, 'utf8'));

    assert.ok(existsSync(report.model), report.model);
    assert.equal(report.top1Agreement, 1);
  });

  it('final ONNX passes onnx.checker', (t) => {
    const python = findPythonWithOnnx();
    if (python === undefined) {
      t.skip('python3 module onnx missing (Debian python3-onnx)');
      return;
    }
    const report = JSON.parse(readFileSync(reportPath, 'utf8'));

    const check = spawnSync(
      python,
      [
        '-c',
        'import sys, onnx; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)',
        report.model,
      ],
      { encoding: 'utf8' },
    );

    assert.equal(check.status, 0, check.stderr);
  });

  it('prints a table per round', () => {
    assert.match(result.stdout, /round/);
    assert.match(result.stdout, /accuracy/);
  });
});

describe('simulate bad input', () => {
  it('missing data directory is explained', () => {
    const missing = path.join(workDir, 'no-such-dir');

    const result = runSimulate(['--data', missing, '--rounds', '1']);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /no-such-dir/);
    assert.match(result.stderr, /download-data/);
  });

  it('quorum above vehicle count is rejected', () => {
    const result = runSimulate([
      '--data',
      DATA_DIR,
      '--vehicles',
      '2',
      '--min-updates',
      '3',
    ]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /--min-updates 3/);
  });

  it('unwritable report path rejected first', () => {
    const report = path.join(workDir, 'no-such-dir', 'r.json');

    const result = runSimulate(['--data', DATA_DIR, '--report', report]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /--report .*no-such-dir.* does not exist/);
    assert.doesNotMatch(result.stderr, /training the centralized/);
  });

  it('state dir that is a file rejected', () => {
    const file = path.join(REPO_ROOT, 'README.md');

    const result = runSimulate(['--data', DATA_DIR, '--state-dir', file]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /--state-dir .*README\.md is a file/);
  });

  it('non-numeric vehicle count is rejected', () => {
    const result = runSimulate(['--vehicles', 'many']);

    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /--vehicles/);
  });
});
