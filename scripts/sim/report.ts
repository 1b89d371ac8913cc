import Table from 'cli-table3';
import type { FaultRecord } from './fault-injector.ts';
import type { DeliverySummary } from './ledger.ts';

/** One round of the report. */
export interface RoundRow {
  round: number;
  /** Model version after the round. */
  modelVersion: number;
  /** Vehicles selected for the round. */
  selected: number;
  accepted: number;
  rejected: number;
  rejectedByReason: Record<string, number>;
  /** Resent copies of an already counted update, rejected as duplicates. */
  duplicatesDropped: number;
  /** Update messages the vehicles published for this round. */
  sent: number;
  /** Outbox entries of this round the vehicles published again. */
  resent: number;
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
  /**
   * DP epsilon spent after this round, at the run's delta; null without
   * differential privacy and for a round that released no model.
   */
  epsilon: number | null;
  /** DP runs: median L2 norm of the round's updates before clipping. */
  medianUpdateNorm?: number;
  /** Error code when the round failed. */
  failure?: string;
  /** Faults injected into this round, by kind; only in a faulty run. */
  faultsInjected?: Record<string, number>;
  /**
   * True when an aggregator restart abandoned the round: no model came
   * out of it, and its counts are those decided before the restart.
   */
  interrupted?: boolean;
  /** Releases published for the interrupted round; 0 unless one leaked. */
  releasesPublished?: number;
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
  /**
   * Attack and aggregation settings; attackerIds are the vehicles that
   * sent poisoned updates or trained on flipped labels.
   */
  robustness: {
    aggregation: unknown;
    byzantineCount: unknown;
    trimFraction: unknown;
    multiKrumSelect: unknown;
    attack: unknown;
    attackScale: unknown;
    attackerIds: string[];
  };
  /** DP-FedAvg settings and outcome; null in a run without DP. */
  privacy: {
    clipNorm: number;
    noiseMultiplier: number;
    targetEpsilon: number;
    delta: number;
    /** Epsilon after the last released round. */
    finalEpsilon: number | null;
    /** Rounds that released a model under DP. */
    roundsRun: number;
    /** True when the budget ended training before the requested rounds. */
    budgetStopped: boolean;
  } | null;
  /** Whether every finished update was decided once, and how. */
  delivery: DeliverySummary;
  /** Faults injected and aggregator restarts; null in a run without faults. */
  faults: FaultRecord | null;
  /**
   * True when the run used mutual TLS with the broker's ACL, signed
   * releases and signed updates (`--secure`).
   */
  secure: boolean;
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
  attackerIds: string[];
  privacyBudgetSpent: boolean;
  delivery: DeliverySummary;
  faults: FaultRecord | undefined;
  secure: boolean;
  federatedMs: number;
  totalMs: number;
}): SimulationReport {
  const withAccuracy = input.rows.filter((row) => row.accuracy !== null);
  const { options } = input;
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
    robustness: {
      aggregation: options.aggregation ?? 'fedavg',
      byzantineCount: options.byzantineCount ?? 0,
      trimFraction: options.trimFraction ?? 0.2,
      multiKrumSelect: options.multiKrumSelect ?? 0,
      attack: input.attackerIds.length === 0 ? null : options.attack,
      attackScale: input.attackerIds.length === 0 ? null : options.attackScale,
      attackerIds: input.attackerIds,
    },
    privacy: privacyOf(options, input.rows, input.privacyBudgetSpent),
    delivery: input.delivery,
    faults: input.faults ?? null,
    secure: input.secure,
    federatedMs: input.federatedMs,
    totalMs: input.totalMs,
  };
}

function privacyOf(
  options: Record<string, unknown>,
  rows: RoundRow[],
  budgetStopped: boolean,
): SimulationReport['privacy'] {
  const dp = options.differentialPrivacy as
    | {
        clipNorm: number;
        noiseMultiplier: number;
        targetEpsilon: number;
        delta: number;
      }
    | undefined;
  if (dp === undefined) return null;
  const released = rows.filter((row) => row.epsilon !== null);
  return {
    clipNorm: dp.clipNorm,
    noiseMultiplier: dp.noiseMultiplier,
    targetEpsilon: dp.targetEpsilon,
    delta: dp.delta,
    finalEpsilon: released.at(-1)?.epsilon ?? null,
    roundsRun: released.length,
    budgetStopped,
  };
}

function kib(bytes: number): string {
  return (bytes / 1024).toFixed(0);
}

/** Prints one line per round to stdout. */
export function printRoundTable(rows: RoundRow[]): void {
  const hasFaults = rows.some((row) => row.faultsInjected !== undefined);
  const hasEpsilon = rows.some((row) => row.epsilon !== null);
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
      ...(hasFaults ? ['selected', 'faults'] : []),
      ...(hasEpsilon ? ['epsilon', 'norm'] : []),
    ],
  });
  for (const row of rows) {
    table.push([
      row.round,
      versionCell(row),
      row.accepted,
      row.rejected,
      row.accuracy === null ? '-' : row.accuracy.toFixed(4),
      kib(row.uplinkBytes),
      kib(row.downlinkBytes),
      row.numExamples,
      (row.durationMs / 1000).toFixed(1),
      ...(hasFaults ? [row.selected, faultsCell(row)] : []),
      ...(hasEpsilon ? epsilonCells(row) : []),
    ]);
  }
  console.log(table.toString());
}

function versionCell(row: RoundRow): string | number {
  if (row.interrupted === true) return `${row.modelVersion} (interrupted)`;
  if (row.failure !== undefined) return `${row.modelVersion} (${row.failure})`;
  return row.modelVersion;
}

function epsilonCells(row: RoundRow): string[] {
  return [
    row.epsilon === null ? '-' : row.epsilon.toFixed(3),
    row.medianUpdateNorm === undefined ? '-' : row.medianUpdateNorm.toFixed(3),
  ];
}

/** Total faults injected into the round. */
function faultsCell(row: RoundRow): number {
  return Object.values(row.faultsInjected ?? {}).reduce((sum, n) => sum + n, 0);
}
