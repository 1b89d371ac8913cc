/**
 * Memory peaks of a child process, measured from inside it. Loaded with
 * `--import` into the broker and the aggregator by simulate-scale, it
 * samples `process.memoryUsage()` and writes the peaks to stderr as one
 * line per second and once more at exit. It does nothing unless
 * FLEETLEARN_MEMORY_PROBE=1, so that importing it for its parser is
 * harmless.
 */
import { writeSync } from 'node:fs';
import { getHeapStatistics } from 'node:v8';

/** Start of every line the probe writes. */
export const MEMORY_LINE_PREFIX = 'fleetlearn-memory ';
/** Environment variable that switches the probe on. */
export const MEMORY_PROBE_ENV = 'FLEETLEARN_MEMORY_PROBE';

const SAMPLE_INTERVAL_MS = 50;
const REPORT_INTERVAL_MS = 1000;

/** Peaks of one process, in bytes. */
export interface MemoryPeaks {
  /** Largest V8 heap in use. */
  heapUsedPeakBytes: number;
  /** Largest heap V8 had reserved. */
  heapTotalPeakBytes: number;
  /** The heap limit V8 enforces (--max-old-space-size plus young space). */
  heapSizeLimitBytes: number;
  /**
   * Largest memory of ArrayBuffers and other objects outside the V8 heap,
   * which the heap limit does not cover.
   */
  externalPeakBytes: number;
  /** Peak resident set size (getrusage maxrss). */
  rssPeakBytes: number;
  samples: number;
}

/** Parses a probe line; undefined when `line` is not one. */
export function parseMemoryLine(line: string): MemoryPeaks | undefined {
  if (!line.startsWith(MEMORY_LINE_PREFIX)) return undefined;
  try {
    const parsed = JSON.parse(line.slice(MEMORY_LINE_PREFIX.length));
    return typeof parsed?.rssPeakBytes === 'number' ? parsed : undefined;
  } catch {
    return undefined;
  }
}

function startProbe(): void {
  const peaks: MemoryPeaks = {
    heapUsedPeakBytes: 0,
    heapTotalPeakBytes: 0,
    heapSizeLimitBytes: getHeapStatistics().heap_size_limit,
    externalPeakBytes: 0,
    rssPeakBytes: 0,
    samples: 0,
  };
  const sample = (): void => {
    const usage = process.memoryUsage();
    peaks.heapUsedPeakBytes = Math.max(peaks.heapUsedPeakBytes, usage.heapUsed);
    peaks.heapTotalPeakBytes = Math.max(
      peaks.heapTotalPeakBytes,
      usage.heapTotal,
    );
    peaks.externalPeakBytes = Math.max(peaks.externalPeakBytes, usage.external);
    // maxRSS is in kilobytes and covers the time between samples too.
    const maxRssBytes = process.resourceUsage().maxRSS * 1024;
    peaks.rssPeakBytes = Math.max(peaks.rssPeakBytes, usage.rss, maxRssBytes);
    peaks.samples += 1;
  };
  // Synchronous, so that the line written at exit is not lost.
  const report = (): void => {
    writeSync(2, `${MEMORY_LINE_PREFIX}${JSON.stringify(peaks)}\n`);
  };
  sample();
  setInterval(sample, SAMPLE_INTERVAL_MS).unref();
  setInterval(report, REPORT_INTERVAL_MS).unref();
  process.on('exit', () => {
    sample();
    report();
  });
}

if (process.env[MEMORY_PROBE_ENV] === '1') startProbe();
