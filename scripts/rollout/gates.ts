/**
 * Rollout gates as pure functions: from the vehicles' latest reports,
 * the figures of the candidate and of the stable version, and the
 * decision to wait, promote or roll back.
 */
import {
  isInCohort,
  type CohortRule,
  type VehicleReport,
  type VersionReport,
} from '../../protocol/index.ts';

/** Thresholds of the gates of every stage. */
export interface GateThresholds {
  /** Cohort vehicles that must report the candidate. */
  minVehicles: number;
  /** Share (0-1) of the known cohort vehicles that must report it. */
  minReportedFraction: number;
  /** Inferences a vehicle's candidate figures must cover to count. */
  minInferences: number;
  /** Lowest candidate accuracy (0-1); 0 disables the absolute check. */
  minAccuracy: number;
  /** Largest accuracy loss against the stable version (0-1). */
  maxAccuracyDrop: number;
  /** Fail the stage when no vehicle reports labelled frames. */
  requireAccuracy: boolean;
  maxP50Ms: number;
  maxP95Ms: number;
  /** Errors per attempted inference (0-1). */
  maxErrorRate: number;
  /** Lowest mean top-1 confidence (0-1). */
  minConfidence: number;
  /** Largest mean-confidence loss against the stable version (0-1). */
  maxConfidenceDrop: number;
  /** Shadow stages: lowest top-1 agreement with the stable version. */
  minAgreement: number;
  /** Time a stage runs before it may be promoted. */
  minStageMs: number;
  /** Time after which a stage without enough reports is rolled back. */
  stageTimeoutMs: number;
}

/** Defaults of the gate thresholds. */
export const DEFAULT_GATES: GateThresholds = {
  minVehicles: 1,
  minReportedFraction: 0.5,
  minInferences: 20,
  minAccuracy: 0,
  maxAccuracyDrop: 0.02,
  requireAccuracy: true,
  maxP50Ms: 20,
  maxP95Ms: 50,
  maxErrorRate: 0.01,
  minConfidence: 0,
  maxConfidenceDrop: 0.1,
  minAgreement: 0.9,
  minStageMs: 10 * 60_000,
  stageTimeoutMs: 60 * 60_000,
};

const FRACTIONS: (keyof GateThresholds)[] = [
  'minReportedFraction',
  'minAccuracy',
  'maxAccuracyDrop',
  'maxErrorRate',
  'minConfidence',
  'maxConfidenceDrop',
  'minAgreement',
];

/**
 * Checks thresholds from user input or a state file.
 *
 * @throws {RangeError} naming the first threshold out of range.
 */
export function checkGates(gates: GateThresholds): GateThresholds {
  for (const [name, value] of Object.entries(gates)) {
    const key = name as keyof GateThresholds;
    if (key === 'requireAccuracy') {
      if (typeof value !== 'boolean') {
        throw new RangeError(
          `gate ${name} is ${value}, expected true or false`,
        );
      }
      continue;
    }
    const isFraction = FRACTIONS.includes(key);
    const ok =
      typeof value === 'number' &&
      Number.isFinite(value) &&
      value >= 0 &&
      (!isFraction || value <= 1);
    if (!ok) {
      throw new RangeError(
        `gate ${name} is ${String(value)}, expected a number ` +
          (isFraction ? 'from 0 to 1' : '>= 0'),
      );
    }
  }
  return gates;
}

/** A model version by number and digest. */
export interface VersionRef {
  version: number;
  sha256: string;
}

/** Figures of one version summed over vehicles. */
export interface VersionFigures {
  vehicles: number;
  inferences: number;
  errors: number;
  errorRate: number;
  labelled: number;
  /** null without labelled frames. */
  accuracy: number | null;
  /** Largest per-vehicle percentile, so one slow vehicle counts. */
  p50Ms: number;
  p95Ms: number;
  meanConfidence: number;
  /** Shadow only; null without comparisons. */
  agreement: number | null;
}

/** Inputs of one gate evaluation. */
export interface GateInput {
  reports: readonly VehicleReport[];
  candidate: VersionRef;
  stable: VersionRef;
  cohort: CohortRule;
  shadow: boolean;
  stageStartedAtMs: number;
  nowMs: number;
  gates: GateThresholds;
}

/** Outcome of one gate evaluation. */
export interface GateEvaluation {
  decision: 'wait' | 'promote' | 'rollback';
  reason: string;
  /** Vehicles known from reports that are in the cohort. */
  cohortVehicles: number;
  /** Cohort vehicles whose report counts for the candidate. */
  reportedVehicles: number;
  required: number;
  candidate: VersionFigures;
  /** Same vehicles' stable figures, else other vehicles'; null if none. */
  stable: VersionFigures | null;
  failures: string[];
}

function sameModel(entry: VersionReport, ref: VersionRef): boolean {
  return (
    entry.version === ref.version &&
    entry.sha256.toLowerCase() === ref.sha256.toLowerCase()
  );
}

/** Sums version entries of several vehicles into one set of figures. */
export function sumFigures(entries: readonly VersionReport[]): VersionFigures {
  let inferences = 0;
  let errors = 0;
  let labelled = 0;
  let correct = 0;
  let compared = 0;
  let agreed = 0;
  let confidenceSum = 0;
  let p50Ms = 0;
  let p95Ms = 0;
  for (const entry of entries) {
    inferences += entry.inferenceCount;
    errors += entry.errorCount;
    labelled += entry.labelledCount;
    correct += entry.correctCount;
    compared += entry.comparedCount;
    agreed += entry.agreedCount;
    confidenceSum += entry.meanConfidence * entry.inferenceCount;
    p50Ms = Math.max(p50Ms, entry.latencyP50Ms);
    p95Ms = Math.max(p95Ms, entry.latencyP95Ms);
  }
  const attempts = inferences + errors;
  return {
    vehicles: entries.length,
    inferences,
    errors,
    errorRate: attempts === 0 ? 0 : errors / attempts,
    labelled,
    accuracy: labelled === 0 ? null : correct / labelled,
    p50Ms,
    p95Ms,
    meanConfidence: inferences === 0 ? 0 : confidenceSum / inferences,
    agreement: compared === 0 ? null : agreed / compared,
  };
}

/** Candidate entries that count, with the same vehicles' stable entries. */
function collectEntries(input: GateInput): {
  cohortVehicles: number;
  candidate: VersionReport[];
  pairedStable: VersionReport[];
  otherStable: VersionReport[];
} {
  const { reports, candidate, stable, cohort, stageStartedAtMs, gates } = input;
  let cohortVehicles = 0;
  const candidateEntries: VersionReport[] = [];
  const pairedStable: VersionReport[] = [];
  const otherStable: VersionReport[] = [];
  for (const report of reports) {
    const stableEntry = report.versions.find((e) => sameModel(e, stable));
    if (!isInCohort(cohort, report.vehicleId, report.tags)) {
      if (stableEntry !== undefined) otherStable.push(stableEntry);
      continue;
    }
    cohortVehicles += 1;
    const entry = report.versions.find((e) => sameModel(e, candidate));
    const counts =
      entry !== undefined &&
      report.createdAtMs >= stageStartedAtMs &&
      entry.inferenceCount >= gates.minInferences;
    if (!counts) continue;
    candidateEntries.push(entry);
    if (stableEntry !== undefined) pairedStable.push(stableEntry);
  }
  return {
    cohortVehicles,
    candidate: candidateEntries,
    pairedStable,
    otherStable,
  };
}

/** Names every threshold the candidate's figures break. */
function failuresOf(
  figures: VersionFigures,
  stable: VersionFigures | null,
  shadow: boolean,
  gates: GateThresholds,
): string[] {
  const failures: string[] = [];
  const fixed = (value: number): string => value.toFixed(3);
  if (figures.accuracy !== null) {
    if (figures.accuracy < gates.minAccuracy) {
      failures.push(
        `accuracy ${fixed(figures.accuracy)} below ${gates.minAccuracy}`,
      );
    }
    const base = stable?.accuracy ?? null;
    if (base !== null && figures.accuracy < base - gates.maxAccuracyDrop) {
      failures.push(
        `accuracy ${fixed(figures.accuracy)} more than ` +
          `${gates.maxAccuracyDrop} below the stable ${fixed(base)}`,
      );
    }
  }
  if (figures.p50Ms > gates.maxP50Ms) {
    failures.push(
      `p50 latency ${fixed(figures.p50Ms)} ms above ${gates.maxP50Ms} ms`,
    );
  }
  if (figures.p95Ms > gates.maxP95Ms) {
    failures.push(
      `p95 latency ${fixed(figures.p95Ms)} ms above ${gates.maxP95Ms} ms`,
    );
  }
  if (figures.errorRate > gates.maxErrorRate) {
    failures.push(
      `error rate ${fixed(figures.errorRate)} above ${gates.maxErrorRate}`,
    );
  }
  if (figures.meanConfidence < gates.minConfidence) {
    failures.push(
      `mean confidence ${fixed(figures.meanConfidence)} below ${gates.minConfidence}`,
    );
  }
  const baseConfidence = stable?.meanConfidence;
  if (
    baseConfidence !== undefined &&
    stable!.inferences > 0 &&
    figures.meanConfidence < baseConfidence - gates.maxConfidenceDrop
  ) {
    failures.push(
      `mean confidence ${fixed(figures.meanConfidence)} more than ` +
        `${gates.maxConfidenceDrop} below the stable ${fixed(baseConfidence)}`,
    );
  }
  if (shadow && figures.agreement !== null) {
    if (figures.agreement < gates.minAgreement) {
      failures.push(
        `shadow agreement ${fixed(figures.agreement)} below ${gates.minAgreement}`,
      );
    }
  }
  return failures;
}

/**
 * Evaluates the gates of the current stage. With enough reports, a broken
 * threshold rolls back at once, and every gate passing promotes once the
 * minimum stage time is over. Too few reports after the stage timeout
 * roll back. Anything else waits.
 */
export function evaluateGates(input: GateInput): GateEvaluation {
  const { gates, nowMs, stageStartedAtMs, shadow } = input;
  const entries = collectEntries(input);
  const candidate = sumFigures(entries.candidate);
  const stableEntries =
    entries.pairedStable.length > 0
      ? entries.pairedStable
      : entries.otherStable;
  const stable = stableEntries.length > 0 ? sumFigures(stableEntries) : null;
  const required = Math.max(
    gates.minVehicles,
    Math.ceil(gates.minReportedFraction * entries.cohortVehicles),
  );
  const result = {
    cohortVehicles: entries.cohortVehicles,
    reportedVehicles: entries.candidate.length,
    required,
    candidate,
    stable,
  };
  const elapsedMs = nowMs - stageStartedAtMs;
  const timedOut = elapsedMs >= gates.stageTimeoutMs;
  const waitOrTimeOut = (reason: string): GateEvaluation =>
    timedOut
      ? {
          ...result,
          decision: 'rollback',
          reason: `stage timed out: ${reason}`,
          failures: [reason],
        }
      : { ...result, decision: 'wait', reason, failures: [] };

  if (entries.candidate.length < required) {
    return waitOrTimeOut(
      `${entries.candidate.length} of ${required} required vehicles reported`,
    );
  }
  const failures = failuresOf(candidate, stable, shadow, gates);
  if (failures.length > 0) {
    return {
      ...result,
      decision: 'rollback',
      reason: failures.join('; '),
      failures,
    };
  }
  if (candidate.accuracy === null && gates.requireAccuracy) {
    return waitOrTimeOut('no vehicle reported labelled frames');
  }
  if (shadow && candidate.agreement === null) {
    return waitOrTimeOut('no vehicle reported shadow comparisons');
  }
  if (elapsedMs < gates.minStageMs) {
    return {
      ...result,
      decision: 'wait',
      reason: `gates pass; stage runs ${gates.minStageMs - elapsedMs} ms more`,
      failures: [],
    };
  }
  return { ...result, decision: 'promote', reason: 'gates pass', failures: [] };
}
