/**
 * Flower-style FedAvg in numpy (flower-fedavg.py beside this file), run
 * with Debian's python3 when python3-numpy is installed.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const SCRIPT = fileURLToPath(new URL('./flower-fedavg.py', import.meta.url));
const PYTHON = '/usr/bin/python3';
const TIMEOUT_MS = 300_000;

export interface NumpyResult {
  numpyVersion: string;
  updates: number;
  size: number;
  /** dtype of the mean numpy returns. */
  dtype: string;
  secondsBest: number;
  secondsAll: number[];
}

/** Returns whether python3 can import numpy. */
export function hasNumpy(): boolean {
  const probe = spawnSync(PYTHON, ['-c', 'import numpy'], { stdio: 'ignore' });
  return probe.status === 0;
}

/**
 * Runs the numpy script and returns its timings.
 *
 * @throws {Error} when the script fails, times out or prints no JSON.
 */
export function benchNumpy(options: {
  updates: number;
  size: number;
  repeats: number;
  seed: number;
}): NumpyResult {
  const args = [
    SCRIPT,
    '--updates',
    String(options.updates),
    '--size',
    String(options.size),
    '--repeats',
    String(options.repeats),
    '--seed',
    String(options.seed),
  ];
  const run = spawnSync(PYTHON, args, {
    encoding: 'utf8',
    timeout: TIMEOUT_MS,
  });
  if (run.status !== 0) {
    throw new Error(
      `${PYTHON} ${args.join(' ')} failed with status ${run.status}` +
        (run.error ? ` (${run.error.message})` : '') +
        `: ${run.stderr.trim()}`,
    );
  }
  try {
    return JSON.parse(run.stdout) as NumpyResult;
  } catch (err) {
    throw new Error(`numpy script printed no JSON: ${run.stdout.trim()}`, {
      cause: err,
    });
  }
}
