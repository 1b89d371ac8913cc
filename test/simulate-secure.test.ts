import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ?? path.join(REPO_ROOT, '../shared/data/gtsrb32');
const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-sim-secure-'));

after(() => rmSync(workDir, { recursive: true, force: true }));

type LogLine = Record<string, unknown>;

function runSimulate(args: string[]) {
  return spawnSync(
    process.execPath,
    ['--import', 'tsx', path.join(REPO_ROOT, 'scripts/simulate.ts'), ...args],
    {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      timeout: 120_000,
      maxBuffer: 64 * 1024 * 1024,
      env: { ...process.env, FLEETLEARN_DATA: '' },
    },
  );
}

/** Parses the pino lines of the run's standard output. */
function logLines(stdout: string): LogLine[] {
  return stdout
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as LogLine);
}

describe('simulate --secure', () => {
  const reportPath = path.join(workDir, 'report.json');
  const started = Date.now();
  const result = runSimulate([
    '--secure',
    '--vehicles',
    '4',
    '--rounds',
    '2',
    '--data',
    DATA_DIR,
    '--seed',
    '3',
    '--state-dir',
    path.join(workDir, 'state'),
    '--report',
    reportPath,
    '--no-centralized',
    '--no-progress',
    '--log-level',
    'info',
  ]);
  const durationMs = Date.now() - started;
  const lines = logLines(result.stdout ?? '');
  const withMessage = (msg: string): LogLine[] =>
    lines.filter((line) => line.msg === msg);

  test('secure run finishes every round', () => {
    assert.equal(result.status, 0, result.stderr);
    const report = JSON.parse(readFileSync(reportPath, 'utf8'));

    assert.equal(report.secure, true);
    assert.equal(report.rounds.length, 2);
    for (const round of report.rounds) {
      assert.equal(round.accepted, 4, `round ${round.round}`);
      assert.equal(round.rejected, 0, `round ${round.round}`);
    }
    assert.equal(report.modelVersion, 2);
    assert.ok(report.finalAccuracy > 0.3, `final ${report.finalAccuracy}`);
    assert.ok(durationMs < 90_000, `took ${durationMs} ms`);
  });

  test('clients authenticate with certificates', () => {
    const [brokerStarted] = withMessage('broker started');
    const authenticated = withMessage('client authenticated');

    assert.equal(brokerStarted.tls, true);
    assert.equal(brokerStarted.clientCertificates, true);
    assert.ok(authenticated.length >= 5, `${authenticated.length} clients`);
    for (const line of authenticated) assert.equal(line.method, 'certificate');
  });

  test('releases and updates are signed', () => {
    const published = withMessage('model release published');
    const agents = withMessage('agent started');
    const sequences = published.map((line) => line.releaseSequence as number);

    assert.equal(published.length, 3);
    assert.equal(new Set(published.map((line) => line.keyId)).size, 1);
    assert.deepEqual(
      sequences,
      [...sequences].sort((a, b) => a - b),
    );
    assert.equal(agents.length, 4);
    for (const line of agents) {
      assert.equal(line.signsUpdates, true);
      assert.equal(line.trustedReleaseKeys, 1);
    }
    assert.deepEqual(withMessage('release rejected'), []);
    assert.deepEqual(withMessage('update rejected'), []);
  });

  test('temporary pki removed afterwards', () => {
    const [provisioned] = withMessage('simulation pki provisioned');

    assert.equal(typeof provisioned.dir, 'string');
    assert.equal(existsSync(provisioned.dir as string), false);
  });

  test('secure with faults rejected', () => {
    const rejected = runSimulate([
      '--secure',
      '--faults',
      'all',
      '--no-progress',
    ]);

    assert.equal(rejected.status, 1);
    assert.match(rejected.stderr, /--secure cannot be combined with --faults/);
  });
});
