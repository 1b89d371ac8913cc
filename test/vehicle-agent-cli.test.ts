import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { MODEL_NAME } from '../models/architecture.ts';
import { className, exportOnnx, sha256Hex } from '../models/index.ts';
import { initializeWeights } from '../models/weight-init.ts';
import { createLogger } from '../protocol/index.ts';
import { ModelDeployment } from '../vehicle-agent/index.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  path.resolve(REPO_ROOT, '../shared/data/gtsrb32');
const IMAGE = path.join(DATA_DIR, 'test', '00000.ppm');
const STOP_CLASS = 14;

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

function runCli(args: string[]): CliResult {
  const result = spawnSync(
    process.execPath,
    ['--import', 'tsx', 'vehicle-agent/main.ts', ...args],
    { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 },
  );
  return {
    status: result.status,
    stdout: result.stdout,
    stderr: result.stderr,
  };
}

function stderrLines(result: CliResult): string[] {
  return result.stderr.trim().split('\n');
}

describe('classify command', () => {
  let workDir: string;
  let stateDir: string;
  let modelFile: string;

  before(async () => {
    workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-cli-'));
    stateDir = path.join(workDir, 'state');
    // A large dense2 bias makes "Stop" the top class for every image.
    const weights = initializeWeights(9);
    weights.get('dense2/bias')![STOP_CLASS] = 20;
    const onnx = exportOnnx(weights);
    modelFile = path.join(workDir, 'model.onnx');
    writeFileSync(modelFile, onnx);
    const deployment = new ModelDeployment(
      stateDir,
      createLogger({ level: 'silent' }),
    );
    await deployment.deploy({
      modelName: MODEL_NAME,
      version: 7,
      sha256: sha256Hex(onnx),
      onnx,
    });
    await deployment.close();
  });

  after(() => {
    if (workDir !== undefined)
      rmSync(workDir, { recursive: true, force: true });
  });

  test('prints top five classes', () => {
    const result = runCli(['classify', IMAGE, '--state-dir', stateDir]);

    assert.equal(result.status, 0, result.stderr);
    const lines = result.stdout.trim().split('\n');
    assert.equal(lines.length, 6);
    assert.match(lines[0], /^model version 7 /);
    assert.match(
      lines[1],
      new RegExp(
        `^1\\. +\\d+\\.\\d\\d%  ${STOP_CLASS}  ${className(STOP_CLASS)}$`,
      ),
    );
    const percents = lines
      .slice(1)
      .map((line) => Number(/(\d+\.\d+)%/.exec(line)![1]));
    assert.deepEqual(
      [...percents].sort((a, b) => b - a),
      percents,
    );
    assert.ok(percents[0] > 99);
  });

  test('reads model from file', () => {
    const result = runCli([
      'classify',
      IMAGE,
      '--model',
      modelFile,
      '--top',
      '3',
    ]);

    assert.equal(result.status, 0, result.stderr);
    const lines = result.stdout.trim().split('\n');
    assert.equal(lines.length, 4);
    assert.ok(lines[1].endsWith(className(STOP_CLASS)));
  });

  test('corrupt image exits with error', () => {
    const broken = path.join(workDir, 'broken.png');
    writeFileSync(broken, Buffer.from('\x89PNG\r\n\x1a\n not really a png'));

    const result = runCli(['classify', broken, '--state-dir', stateDir]);

    assert.equal(result.status, 1);
    assert.equal(result.stdout, '');
    assert.equal(stderrLines(result).length, 1);
    assert.match(result.stderr, /^error: invalid image .*broken\.png/);
  });

  test('missing image exits with error', () => {
    const result = runCli([
      'classify',
      path.join(workDir, 'nope.ppm'),
      '--state-dir',
      stateDir,
    ]);

    assert.equal(result.status, 1);
    assert.equal(stderrLines(result).length, 1);
    assert.match(result.stderr, /^error: cannot read image .*nope\.ppm/);
  });

  test('missing model exits with error', () => {
    const emptyState = path.join(workDir, 'empty-state');

    const result = runCli(['classify', IMAGE, '--state-dir', emptyState]);

    assert.equal(result.status, 1);
    assert.equal(stderrLines(result).length, 1);
    assert.match(result.stderr, /^error: no model deployed in /);
  });

  test('closed stdout exits quietly', async () => {
    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        'vehicle-agent/main.ts',
        'classify',
        IMAGE,
        '--model',
        modelFile,
        '--top',
        '43',
      ],
      { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    // Closing the read end first makes every write fail with EPIPE, as
    // after `| head -1` has exited.
    child.stdout.destroy();
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk));
    const [code] = await once(child, 'exit', {
      signal: AbortSignal.timeout(60_000),
    });

    assert.equal(code, 0, stderr);
    assert.equal(stderr, '');
  });

  test('run help lists data fallbacks', () => {
    const result = runCli(['run', '--help']);

    assert.equal(result.status, 0, result.stderr);
    const help = result.stdout.replace(/\s+/g, ' ');
    assert.match(
      help,
      /FLEETLEARN_DATA, else the first directory that exists of data\/gtsrb32-full, data\/gtsrb32 and \.\.\/shared\/data\/gtsrb32/,
    );
  });

  test('requires one model source', () => {
    const result = runCli(['classify', IMAGE]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /^error: give exactly one of --state-dir/);
  });
});
