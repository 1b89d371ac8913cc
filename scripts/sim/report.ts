import Table from 'cli-table3';

/** One round of the report. */
export interface RoundRow {
  round: number;
  /** Model version after the round. */
  modelVersion: number;
  accepted: number;
  rejected: number;
  rejectedByReason: Record<string, number>;
  /** Resent copies of an already counted update, rejected as duplicates. */
  duplicatesDropped: number;
  /** Update messages the vehicles published for this round. */
  sent: number;
  /** Update messages for this round the aggregator received and decided on. */
  delivered: number;
  /** Top-1 test accuracy of the published ONNX model, measured with onnxruntime. */
  accuracy: number | null;
  /** Update bytes the aggregator received. */
  uplinkBytes: number;
  /**
   * Bytes the vehicles received since the previous round closed: this
   * round's task and the previous round's release.
   */
  downlinkBytes: number;
  numExamples: number;
  durationMs: number;
  /** Error code when the round failed. */
  failure?: string;
}

export interface SimulationReport {
  options: Record<string, unknown>;
  backend: string;
  baseAccuracy: number;
  centralizedAccuracy: number | null;
  finalAccuracy: number | null;
  /** Path of the final ONNX file. */
  model: string;
  modelVersion: number;
  /** Share of test images where ONNX and TF.js agree on the top-1 class. */
  top1Agreement: number;
  rounds: RoundRow[];
  federatedMs: number;
  totalMs: number;
}

export function buildReport(input: {
  options: Record<string, unknown>;
  backend: string;
  baseAccuracy: number;
  centralizedAccuracy: number | undefined;
  modelPath: string;
  modelVersion: number;
  top1Agreement: number;
  rows: RoundRow[];
  federatedMs: number;
  totalMs: number;
}): SimulationReport {
  const withAccuracy = input.rows.filter((row) => row.accuracy !== null);
  return {
    options: input.options,
    backend: input.backend,
    baseAccuracy: input.baseAccuracy,
    centralizedAccuracy: input.centralizedAccuracy ?? null,
    finalAccuracy: withAccuracy.at(-1)?.accuracy ?? null,
    model: input.modelPath,
    modelVersion: input.modelVersion,
    top1Agreement: input.top1Agreement,
    rounds: input.rows,
    federatedMs: input.federatedMs,
    totalMs: input.totalMs,
  };
}

function kib(bytes: number): string {
  return (bytes / 1024).toFixed(0);
}

/** Prints one line per round to stdout. */
export function printRoundTable(rows: RoundRow[]): void {
  const table = new Table({
    style: { head: [], border: [] },
    head: [
      'round',
      'version',
      'accepted',
      'rejected',
      'accuracy',
      'up KiB',
      'down KiB',
      'examples',
      'seconds',
    ],
  });
  for (const row of rows) {
    table.push([
      row.round,
      row.failure === undefined
        ? row.modelVersion
        : `${row.modelVersion} (${row.failure})`,
      row.accepted,
      row.rejected,
      row.accuracy === null ? '-' : row.accuracy.toFixed(4),
      kib(row.uplinkBytes),
      kib(row.downlinkBytes),
      row.numExamples,
      (row.durationMs / 1000).toFixed(1),
    ]);
  }
  console.log(table.toString());
}
