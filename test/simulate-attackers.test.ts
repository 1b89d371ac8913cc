import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ?? path.join(REPO_ROOT, '../shared/data/gtsrb32');
const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-attack-test-'));

after(() => rmSync(workDir, { recursive: true, force: true }));

interface AttackReport {
  baseAccuracy: number;
  finalAccuracy: number;
  rounds: Array<{ accepted: number; rejected: number }>;
  robustness: {
    aggregation: string;
    attack: string | null;
    attackScale: number | null;
    attackerIds: string[];
  };
}

/** Runs one round of 5 vehicles, the first one boosting by 1e6. */
function runAttacked(aggregation: string): {
  status: number | null;
  stderr: string;
  report?: AttackReport;
} {
  const reportPath = path.join(workDir, `${aggregation}.json`);
  const result = spawnSync(
    process.execPath,
    [
      '--import',
      'tsx',
      path.join(REPO_ROOT, 'scripts/simulate.ts'),
      ...['--vehicles', '5', '--rounds', '1', '--seed', '3'],
      ...['--data', DATA_DIR, '--no-centralized', '--no-progress'],
      ...['--attackers', '1', '--attack', 'boost', '--attack-scale', '1e6'],
      ...['--aggregation', aggregation, '--byzantine-count', '1'],
      ...['--state-dir', path.join(workDir, aggregation)],
      ...['--report', reportPath],
    ],
    { cwd: REPO_ROOT, encoding: 'utf8', timeout: 120_000 },
  );
  if (result.status !== 0) return result;
  const report = JSON.parse(readFileSync(reportPath, 'utf8')) as AttackReport;
  return { ...result, report };
}

describe('simulate with attackers', () => {
  const fedavg = runAttacked('fedavg');
  const median = runAttacked('median');

  it('boosted update ruins fedavg', () => {
    assert.equal(fedavg.status, 0, fedavg.stderr);
    const report = fedavg.report!;
    assert.equal(report.rounds[0].accepted, 5);
    assert.equal(report.rounds[0].rejected, 0);
    assert.ok(
      report.finalAccuracy < report.baseAccuracy - 0.2,
      `final ${report.finalAccuracy}, base ${report.baseAccuracy}`,
    );
  });

  it('median withstands boosted update', () => {
    assert.equal(median.status, 0, median.stderr);
    const report = median.report!;
    assert.equal(report.rounds[0].accepted, 5);
    assert.ok(
      report.finalAccuracy > report.baseAccuracy - 0.02,
      `final ${report.finalAccuracy}, base ${report.baseAccuracy}`,
    );
  });

  it('report records attack settings', () => {
    const { robustness } = median.report!;
    assert.equal(robustness.aggregation, 'median');
    assert.equal(robustness.attack, 'boost');
    assert.equal(robustness.attackScale, 1e6);
    assert.deepEqual(robustness.attackerIds, ['veh-001']);
  });

  it('attackers above vehicles rejected', () => {
    const result = spawnSync(
      process.execPath,
      [
        '--import',
        'tsx',
        path.join(REPO_ROOT, 'scripts/simulate.ts'),
        ...['--data', DATA_DIR, '--vehicles', '2', '--attackers', '3'],
      ],
      { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 },
    );
    assert.equal(result.status, 1);
    assert.match(result.stderr, /--attackers 3 is above --vehicles 2/);
  });
});
