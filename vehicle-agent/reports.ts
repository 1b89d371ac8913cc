/**
 * Inference figures per model version on the vehicle, for the rollout
 * controller's gates: counts, single-image latency percentiles, errors,
 * mean top-1 confidence, accuracy on held-out labelled frames, and the
 * agreement of a shadow candidate with the model in service.
 */
import { NUM_CLASSES } from '../models/architecture.ts';
import { VersionRole, type VersionReport } from '../protocol/index.ts';

/** Latency samples kept per version; older ones are overwritten. */
const MAX_LATENCY_SAMPLES = 2048;

/** Identity of a model version: number and digest. */
export interface ModelIdentity {
  version: number;
  sha256: string;
}

/**
 * Returns the nearest-rank percentile `q` (0-1) of `values`, or 0 for
 * none. Nearest rank keeps every result a measured value.
 */
export function percentile(values: readonly number[], q: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil(q * sorted.length));
  return sorted[Math.min(rank, sorted.length) - 1];
}

/** Top-1 class and its probability of each of `count` images. */
export function topOneOf(
  probabilities: Float32Array,
  count: number,
): { classIds: Int32Array; confidences: Float32Array } {
  if (probabilities.length !== count * NUM_CLASSES) {
    throw new RangeError(
      `expected ${count * NUM_CLASSES} probabilities for ${count} images, ` +
        `received ${probabilities.length}`,
    );
  }
  const classIds = new Int32Array(count);
  const confidences = new Float32Array(count);
  for (let image = 0; image < count; image++) {
    const row = probabilities.subarray(
      image * NUM_CLASSES,
      (image + 1) * NUM_CLASSES,
    );
    let best = 0;
    for (let c = 1; c < NUM_CLASSES; c++) if (row[c] > row[best]) best = c;
    classIds[image] = best;
    confidences[image] = row[best];
  }
  return { classIds, confidences };
}

/** Running figures of one model version. */
export class VersionStats {
  inferenceCount = 0;
  errorCount = 0;
  private confidenceSum = 0;
  private readonly latenciesMs: number[] = [];
  private nextSample = 0;
  /** Result of the last evaluation on held-out frames. */
  labelledCount = 0;
  correctCount = 0;
  comparedCount = 0;
  agreedCount = 0;

  /**
   * Records one call that classified `count` images in `durationMs`; each
   * image counts as one inference taking `durationMs / count`.
   */
  recordInference(
    durationMs: number,
    confidences: Float32Array,
    count: number,
  ): void {
    const perImageMs = durationMs / Math.max(count, 1);
    for (let i = 0; i < count; i++) {
      this.addLatency(perImageMs);
      this.confidenceSum += confidences[i];
    }
    this.inferenceCount += count;
  }

  /** Counts `count` images whose inference failed. */
  recordError(count: number): void {
    this.errorCount += count;
  }

  /** Replaces the accuracy figures with those of the latest evaluation. */
  recordEvaluation(labelledCount: number, correctCount: number): void {
    this.labelledCount = labelledCount;
    this.correctCount = correctCount;
  }

  /** Adds shadow comparisons: images compared and top-1 agreements. */
  recordComparison(comparedCount: number, agreedCount: number): void {
    this.comparedCount += comparedCount;
    this.agreedCount += agreedCount;
  }

  private addLatency(ms: number): void {
    if (this.latenciesMs.length < MAX_LATENCY_SAMPLES) {
      this.latenciesMs.push(ms);
      return;
    }
    this.latenciesMs[this.nextSample] = ms;
    this.nextSample = (this.nextSample + 1) % MAX_LATENCY_SAMPLES;
  }

  /** The figures as a VersionReport of `model` in `role`. */
  toReport(model: ModelIdentity, role: number): VersionReport {
    return {
      version: model.version,
      sha256: model.sha256,
      role,
      inferenceCount: this.inferenceCount,
      errorCount: this.errorCount,
      latencyP50Ms: percentile(this.latenciesMs, 0.5),
      latencyP95Ms: percentile(this.latenciesMs, 0.95),
      meanConfidence:
        this.inferenceCount === 0
          ? 0
          : this.confidenceSum / this.inferenceCount,
      labelledCount: this.labelledCount,
      correctCount: this.correctCount,
      comparedCount: this.comparedCount,
      agreedCount: this.agreedCount,
    };
  }
}

function keyOf(model: ModelIdentity): string {
  return `${model.version}:${model.sha256.toLowerCase()}`;
}

/**
 * Figures of every model version the vehicle runs. A version's figures
 * start when it is first used in this process and are dropped once it is
 * neither current, previous nor shadow.
 */
export class InferenceStats {
  private readonly byModel = new Map<string, VersionStats>();

  /** Figures of `model`, created empty on first use. */
  of(model: ModelIdentity): VersionStats {
    const key = keyOf(model);
    let stats = this.byModel.get(key);
    if (stats === undefined) {
      stats = new VersionStats();
      this.byModel.set(key, stats);
    }
    return stats;
  }

  /**
   * Builds the report entries of the loaded models and forgets every
   * other version.
   */
  reportsOf(loaded: {
    serving?: ModelIdentity;
    previous?: ModelIdentity;
    shadow?: ModelIdentity;
  }): VersionReport[] {
    const entries: [ModelIdentity | undefined, number][] = [
      [loaded.serving, VersionRole.Serving],
      [loaded.previous, VersionRole.Previous],
      [loaded.shadow, VersionRole.Shadow],
    ];
    const kept = new Set<string>();
    const reports: VersionReport[] = [];
    for (const [model, role] of entries) {
      if (model === undefined) continue;
      kept.add(keyOf(model));
      reports.push(this.of(model).toReport(model, role));
    }
    for (const key of [...this.byModel.keys()]) {
      if (!kept.has(key)) this.byModel.delete(key);
    }
    return reports;
  }
}
