import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import type { RunningBroker } from '../broker/index.ts';
import {
  FLEET_ID,
  createWorkspace,
  fetchRetainedRelease,
  startTestBroker,
  type Workspace,
} from './aggregator-fixtures.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('..', import.meta.url));

/** Runs aggregator/main.ts with `args`; resolves at `waitFor` or exit. */
function runAggregator(args: string[], waitFor?: string) {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'aggregator/main.ts', ...args],
    { cwd: REPOSITORY_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  const exited = once(child, 'exit') as Promise<[number | null, string | null]>;
  const reached = new Promise<void>((resolve, reject) => {
    const onData = (chunk: Buffer): void => {
      output += chunk.toString();
      if (waitFor !== undefined && output.includes(waitFor)) resolve();
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', () =>
      waitFor === undefined ? resolve() : reject(new Error(output)),
    );
  });
  return { child, exited, reached, output: () => output };
}

describe('aggregator command line', () => {
  let broker: RunningBroker;
  let workspace: Workspace;

  before(async () => {
    broker = await startTestBroker();
    workspace = createWorkspace();
  });

  after(async () => {
    await broker.close();
    workspace.remove();
  });

  test('sigterm stops with exit 0', async () => {
    const run = runAggregator(
      [
        '--fleet-id',
        FLEET_ID,
        '--broker-url',
        `mqtt://127.0.0.1:${broker.port}`,
        '--state-dir',
        join(workspace.dir, 'state'),
        '--base-weights',
        workspace.baseWeightsPath,
        '--round-timeout-ms',
        '5000',
      ],
      'waiting for vehicles',
    );
    await run.reached;
    const release = await fetchRetainedRelease(broker);

    run.child.kill('SIGTERM');
    const [code] = await run.exited;

    assert.equal(release.version, 0);
    assert.equal(code, 0, run.output());
    assert.match(run.output(), /aggregator stopped/);
  });

  test('invalid option exits with 2', async () => {
    const run = runAggregator([
      '--state-dir',
      join(workspace.dir, 'unused'),
      '--base-weights',
      workspace.baseWeightsPath,
      '--vehicles-per-round',
      '2',
      '--min-updates',
      '3',
    ]);

    const [code] = await run.exited;

    assert.equal(code, 2);
    assert.match(run.output(), /INVALID_CONFIG/);
  });
});
