import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ErrorCode } from '../protocol/index.ts';
import { FAULT_KINDS } from '../scripts/sim/faults.ts';
import type { SimulationReport } from '../scripts/sim/report.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ?? path.join(REPO_ROOT, '../shared/data/gtsrb32');
const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-faults-test-'));
const ROUNDS = 3;

after(() => rmSync(workDir, { recursive: true, force: true }));

function runSimulate(args: string[]) {
  return spawnSync(
    process.execPath,
    ['--import', 'tsx', path.join(REPO_ROOT, 'scripts/simulate.ts'), ...args],
    {
      cwd: REPO_ROOT,
      encoding: 'utf8',
      timeout: 120_000,
      env: { ...process.env, FLEETLEARN_DATA: '' },
    },
  );
}

describe('simulate with every fault', () => {
  const reportPath = path.join(workDir, 'report.json');
  // A 6 s deadline keeps the rounds that wait for a delayed vehicle short.
  const result = runSimulate([
    '--vehicles',
    '6',
    '--rounds',
    String(ROUNDS),
    '--data',
    DATA_DIR,
    '--seed',
    '2',
    '--faults',
    'all',
    '--round-timeout-ms',
    '6000',
    '--state-dir',
    path.join(workDir, 'state'),
    '--report',
    reportPath,
    '--no-centralized',
    '--no-progress',
    '--log-level',
    'error',
  ]);
  const report = (): SimulationReport =>
    JSON.parse(readFileSync(reportPath, 'utf8'));

  it('exits 0 and prints the delivery line', () => {
    assert.equal(result.status, 0, result.stderr);
    assert.match(result.stderr, /delivery: \d+ finished updates/);
  });

  it('loses and double counts nothing', () => {
    const { delivery } = report();

    assert.ok(delivery.finishedUpdates > 0);
    assert.equal(delivery.lost, 0, JSON.stringify(delivery.lostUpdateIds));
    assert.equal(delivery.doubleCounted, 0);
    assert.equal(delivery.unattributedDecisions, 0);
    assert.equal(delivery.pendingAtEnd, 0);
    assert.equal(
      delivery.acceptedOnce + delivery.rejectedWithReason,
      delivery.finishedUpdates,
    );
  });

  it('injects every fault kind', () => {
    const { faults } = report();

    assert.ok(faults !== null);
    for (const kind of FAULT_KINDS) {
      assert.ok(faults.injected[kind] >= 1, `${kind} never injected`);
    }
  });

  it('rejects every bad payload with a code', () => {
    const { delivery } = report();
    const codes: string[] = Object.values(ErrorCode);

    assert.ok(delivery.injectedPayloads > 0);
    assert.equal(delivery.injectedRejected, delivery.injectedPayloads);
    assert.equal(delivery.injectedAccepted, 0);
    assert.equal(delivery.injectedUndecided, 0);
    for (const [kind, byCode] of Object.entries(delivery.injectedByKind)) {
      for (const code of Object.keys(byCode)) {
        assert.ok(codes.includes(code), `${kind} answered ${code}`);
      }
    }
  });

  it('completes rounds around the restart', () => {
    const { rounds, faults, modelVersion } = report();
    const interrupted = rounds.filter((row) => row.interrupted === true);
    const completed = rounds.filter((row) => row.interrupted !== true);

    assert.equal(completed.length, ROUNDS);
    assert.equal(interrupted.length, 1);
    assert.equal(interrupted[0].releasesPublished, 0);
    assert.equal(modelVersion, ROUNDS);
    for (const row of completed) {
      assert.equal(row.failure, undefined, `round ${row.round}`);
      assert.notEqual(row.accuracy, null, `round ${row.round}`);
      assert.ok(row.accuracy! > 0.5, `round ${row.round} accuracy`);
      assert.ok(row.faultsInjected !== undefined);
    }
    const restart = faults!.restarts[0];
    assert.equal(restart.interruptedRound, interrupted[0].round);
    assert.equal(restart.modelVersionAfter, restart.modelVersionBefore);
  });
});

describe('simulate fault flags', () => {
  it('rejects an unknown fault kind', () => {
    const result = runSimulate(['--faults', 'kill-agent,meteor']);

    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /unknown fault kind "meteor"/);
  });

  it('rejects a fault rate above 1', () => {
    const result = runSimulate(['--faults', 'all', '--fault-rate', '1.5']);

    assert.notEqual(result.status, 0);
    assert.match(result.stderr, /expected a number in \(0, 1\]/);
  });
});
