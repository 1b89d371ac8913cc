/**
 * The broker and the aggregator of a scale run, each in its own Node.js
 * process: started with the memory probe, followed through their pino
 * lines on stdout, measured through /proc, and ended by pid.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import {
  MEMORY_PROBE_ENV,
  parseMemoryLine,
  type MemoryPeaks,
} from './light-memory-probe.ts';

const REPOSITORY_ROOT = fileURLToPath(new URL('../..', import.meta.url));
const PROBE_PATH = fileURLToPath(
  new URL('./light-memory-probe.ts', import.meta.url),
);
/** Interval of the /proc/<pid>/status polls. */
const PROC_POLL_INTERVAL_MS = 200;
/** Stderr lines kept for error messages. */
const STDERR_TAIL_LINES = 20;

/** A pino line of a child, parsed. */
export type LogRecord = Record<string, unknown> & { msg?: string };

/** Exit code or signal of a child process. */
export interface ChildExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** Entry file, arguments and heap limit of a child process. */
export interface ChildSpec {
  /** Name in messages: 'broker' or 'aggregator'. */
  name: string;
  /** Entry file, relative to the repository root. */
  script: string;
  args: string[];
  /** V8 old-space limit (--max-old-space-size), in MiB. */
  maxOldSpaceMb?: number;
}

/** Reads VmHWM (peak RSS) of `pid` from /proc, in bytes. */
export function readPeakRssBytes(pid: number): number | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const match = /^VmHWM:\s+(\d+) kB$/m.exec(status);
    return match === null ? undefined : Number(match[1]) * 1024;
  } catch {
    // The process has exited, or /proc is missing (not Linux).
    return undefined;
  }
}

/** One child process of the run. */
export class ChildNode {
  readonly name: string;
  readonly pid: number;
  /** Resolves once the process has exited. */
  readonly exited: Promise<ChildExit>;
  readonly #child: ChildProcess;
  readonly #listeners = new Set<(record: LogRecord) => void>();
  readonly #stderrTail: string[] = [];
  readonly #pollTimer: NodeJS.Timeout;
  #exit: ChildExit | undefined;
  #memory: MemoryPeaks | undefined;
  #procPeakRssBytes = 0;

  /** @throws {Error} when the process cannot be spawned. */
  constructor(spec: ChildSpec) {
    this.name = spec.name;
    const nodeArgs = [
      ...(spec.maxOldSpaceMb === undefined
        ? []
        : [`--max-old-space-size=${spec.maxOldSpaceMb}`]),
      '--import',
      'tsx',
      '--import',
      PROBE_PATH,
      spec.script,
      ...spec.args,
    ];
    this.#child = spawn(process.execPath, nodeArgs, {
      cwd: REPOSITORY_ROOT,
      env: { ...process.env, [MEMORY_PROBE_ENV]: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    // Without a listener, a spawn failure would end this process.
    this.#child.on('error', (err) => this.#keepStderr(String(err)));
    if (this.#child.pid === undefined) {
      throw new Error(`${spec.name} process could not be spawned`);
    }
    this.pid = this.#child.pid;
    this.exited = new Promise((resolve) => {
      this.#child.once('exit', (code, signal) => {
        this.#exit = { code, signal };
        clearInterval(this.#pollTimer);
        resolve(this.#exit);
      });
    });
    this.#pollTimer = setInterval(
      () => this.#pollProc(),
      PROC_POLL_INTERVAL_MS,
    );
    this.#pollTimer.unref();
    createInterface({ input: this.#child.stdout! }).on('line', (line) =>
      this.#onStdout(line),
    );
    createInterface({ input: this.#child.stderr! }).on('line', (line) =>
      this.#onStderr(line),
    );
  }

  /** The exit, once the process has ended. */
  get exit(): ChildExit | undefined {
    return this.#exit;
  }

  /**
   * Memory peaks: the probe's last report, with the RSS peak raised to the
   * /proc polls' when those saw more.
   */
  get memory(): MemoryPeaks | undefined {
    const probe = this.#memory;
    if (probe === undefined) return undefined;
    return {
      ...probe,
      rssPeakBytes: Math.max(probe.rssPeakBytes, this.#procPeakRssBytes),
    };
  }

  /** Calls `listener` with every pino line the process writes. */
  onLog(listener: (record: LogRecord) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /**
   * Resolves with the first line whose `msg` is one of `messages` and that
   * passes `accept`. Rejects when the process exits first, after
   * `timeoutMs`, or when `signal` aborts.
   */
  waitForLog(
    messages: string | readonly string[],
    timeoutMs: number,
    signal: AbortSignal,
    accept: (record: LogRecord) => boolean = () => true,
  ): Promise<LogRecord> {
    const wanted = typeof messages === 'string' ? [messages] : messages;
    const message = wanted.join('" or "');
    return new Promise((resolve, reject) => {
      const finish = (error: Error | undefined, record?: LogRecord): void => {
        clearTimeout(timer);
        unsubscribe();
        signal.removeEventListener('abort', onAbort);
        if (error === undefined) resolve(record!);
        else reject(error);
      };
      const onAbort = (): void => finish(signal.reason as Error);
      const timer = setTimeout(
        () =>
          finish(
            new Error(
              `${this.name} did not log "${message}" within ${timeoutMs} ms`,
            ),
          ),
        timeoutMs,
      );
      const unsubscribe = this.onLog((record) => {
        if (wanted.includes(record.msg ?? '') && accept(record)) {
          finish(undefined, record);
        }
      });
      signal.addEventListener('abort', onAbort);
      this.exited.then((exit) => finish(this.#exitedError(exit, message)));
      if (signal.aborted) onAbort();
    });
  }

  /**
   * Sends SIGTERM, and SIGKILL when the process has not exited after
   * `timeoutMs`. Resolves with the exit.
   */
  async stop(timeoutMs: number): Promise<ChildExit> {
    if (this.#exit !== undefined) return this.#exit;
    this.#child.kill('SIGTERM');
    const timer = setTimeout(() => this.#child.kill('SIGKILL'), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Kills the process at once; for the driver's own exit. */
  killNow(): void {
    if (this.#exit === undefined) this.#child.kill('SIGKILL');
  }

  /** Returns the last stderr lines, for error messages. */
  stderrTail(): string {
    return this.#stderrTail.join('\n');
  }

  #exitedError(exit: ChildExit, waitingFor: string): Error {
    const how =
      exit.signal === null ? `code ${exit.code}` : `signal ${exit.signal}`;
    const tail = this.stderrTail();
    return new Error(
      `${this.name} (pid ${this.pid}) exited with ${how} before logging ` +
        `"${waitingFor}"` +
        (tail === '' ? '' : `; its last stderr lines:\n${tail}`),
    );
  }

  #onStdout(line: string): void {
    let record: LogRecord;
    try {
      record = JSON.parse(line) as LogRecord;
    } catch {
      this.#keepStderr(line);
      return;
    }
    for (const listener of [...this.#listeners]) listener(record);
  }

  #onStderr(line: string): void {
    const memory = parseMemoryLine(line);
    if (memory !== undefined) this.#memory = memory;
    else this.#keepStderr(line);
  }

  #keepStderr(line: string): void {
    this.#stderrTail.push(line);
    if (this.#stderrTail.length > STDERR_TAIL_LINES) this.#stderrTail.shift();
  }

  #pollProc(): void {
    const peak = readPeakRssBytes(this.pid);
    if (peak !== undefined) {
      this.#procPeakRssBytes = Math.max(this.#procPeakRssBytes, peak);
    }
  }
}
