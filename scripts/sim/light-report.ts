/**
 * Report of a scale run: the JSON written by --report, the table printed
 * at the end, and the progress shown on stderr while it runs.
 */
import cliProgress from 'cli-progress';
import Table from 'cli-table3';
import type { MemoryPeaks } from './light-memory-probe.ts';
import type { LightRoundCounts } from './light-fleet.ts';
import type { ChildExit } from './light-processes.ts';

/** One round as the aggregator logged it and the vehicles counted it. */
export interface ScaleRoundRow extends LightRoundCounts {
  /** 'closed' or 'failed'. */
  outcome: string;
  /** The aggregator's close trigger: all-responded or deadline. */
  trigger: string;
  modelVersion: number;
  selected: number;
  /** Updates the aggregator accepted and rejected. */
  accepted: number;
  rejected: number;
  /** Reason code of a failed round, '' otherwise. */
  failureCode: string;
  /** From the 'round opened' line to the 'round closed' line, as read. */
  wallTimeMs: number;
  /** The aggregator's own duration, open to release published. */
  aggregatorDurationMs: number;
}

/** The JSON report of `simulate-scale`. */
export interface ScaleReport {
  vehicles: number;
  rounds: ScaleRoundRow[];
  seed: number;
  settings: {
    aggregatorHeapMb: number;
    publishWindowMs: number;
    maxPendingUpdates: number;
    connectBatch: number;
    connectIntervalMs: number;
    roundTimeoutMs: number;
    templates: number;
    templateImages: number;
  };
  templateTrainingMs: number;
  /** Examples each template trained on. */
  templateExamples: number[];
  connectMs: number;
  totalMs: number;
  peakPendingUpdates: number;
  unexpectedAcks: number;
  reconnects: number;
  memory: {
    aggregator: MemoryPeaks | undefined;
    broker: MemoryPeaks | undefined;
    /** The process running the light vehicles. */
    driver: { rssPeakBytes: number; heapUsedPeakBytes: number };
  };
  /** Pids and exits of the child processes, for checking the cleanup. */
  processes: {
    broker: { pid: number; exit: ChildExit | undefined };
    aggregator: { pid: number; exit: ChildExit | undefined };
  };
  stateDir: string;
}

const MIB = 1024 * 1024;

function mib(bytes: number | undefined): string {
  return bytes === undefined ? '-' : `${(bytes / MIB).toFixed(1)} MiB`;
}

/** Prints the per-round table and the memory peaks to stdout. */
export function printScaleReport(report: ScaleReport): void {
  const table = new Table({
    head: [
      'round',
      'outcome',
      'accepted',
      'rejected',
      'acks ok',
      'uplink',
      'wall time',
      'ack p50/max',
    ],
  });
  for (const row of report.rounds) {
    table.push([
      row.round,
      row.outcome === 'closed' ? row.trigger : `failed ${row.failureCode}`,
      `${row.accepted}/${row.selected}`,
      row.rejected,
      row.acksAccepted,
      mib(row.uplinkBytes),
      `${(row.wallTimeMs / 1000).toFixed(1)} s`,
      `${row.ackLatencyP50Ms}/${row.ackLatencyMaxMs} ms`,
    ]);
  }
  console.log(table.toString());
  const { aggregator, broker, driver } = report.memory;
  console.log(
    `aggregator: heap peak ${mib(aggregator?.heapUsedPeakBytes)} of a ` +
      `${mib(aggregator?.heapSizeLimitBytes)} limit, RSS peak ` +
      `${mib(aggregator?.rssPeakBytes)}, external peak ` +
      `${mib(aggregator?.externalPeakBytes)}`,
  );
  console.log(
    `broker: heap peak ${mib(broker?.heapUsedPeakBytes)}, RSS peak ` +
      `${mib(broker?.rssPeakBytes)}; vehicles' process: RSS peak ` +
      `${mib(driver.rssPeakBytes)}`,
  );
  console.log(
    `${report.vehicles} vehicles connected in ` +
      `${(report.connectMs / 1000).toFixed(1)} s, ` +
      `templates trained in ${(report.templateTrainingMs / 1000).toFixed(1)} s, ` +
      `total ${(report.totalMs / 1000).toFixed(1)} s`,
  );
}

/**
 * Progress on stderr: a bar on a terminal, otherwise a line per phase
 * and about one per 5 s while a round runs.
 */
export class ScaleProgress {
  readonly #bar: cliProgress.SingleBar | undefined;
  readonly #vehicles: number;
  #lastLineMs = 0;

  constructor(vehicles: number, interactive: boolean) {
    this.#vehicles = vehicles;
    if (!interactive) return;
    this.#bar = new cliProgress.SingleBar(
      {
        format: '{phase} |{bar}| {value}/{total}',
        hideCursor: true,
        stream: process.stderr,
      },
      cliProgress.Presets.shades_classic,
    );
    this.#bar.start(vehicles, 0, { phase: 'connecting' });
  }

  /** Sets the phase and its count; `force` prints a line without a bar. */
  show(phase: string, value: number, force = false): void {
    if (this.#bar !== undefined) {
      this.#bar.update(value, { phase });
      return;
    }
    const now = Date.now();
    if (!force && now - this.#lastLineMs < 5000) return;
    this.#lastLineMs = now;
    console.error(`${phase}: ${value}/${this.#vehicles}`);
  }

  stop(): void {
    this.#bar?.stop();
  }
}
