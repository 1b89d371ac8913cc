/**
 * On-device evaluation and inference reports: the agent times every
 * classification, evaluates the current, previous and shadow models on
 * held-out labelled frames after each deployment and on a timer, and
 * publishes a retained VehicleReport each time.
 */
import type { EventEmitter } from 'node:events';
import { performance } from 'node:perf_hooks';
import { MODEL_NAME } from '../models/architecture.ts';
import { IMAGE_VALUES, subset, type LabelledImages } from '../models/index.ts';
import {
  encodeVehicleReport,
  type Logger,
  type VehicleReport,
} from '../protocol/index.ts';
import type { DeployedModel, ModelDeployment } from './deployment.ts';
import type { AgentEvents } from './events.ts';
import { InferenceStats, topOneOf } from './reports.ts';
import type { ShadowModel } from './shadow.ts';

/**
 * Splits `count` frames off `frames` for evaluation, spread evenly over
 * the set (every k-th frame), so that they cover its classes even when
 * the frames are sorted by class. The rest are for training.
 *
 * NOTE: frames of one sign track can land on both sides, which makes the
 * accuracy optimistic; the gates compare versions on the same frames.
 *
 * @throws {RangeError} when `count` is not an integer from 0 to
 *   frames.count - 1.
 */
export function holdOutFrames(
  frames: LabelledImages,
  count: number,
): { training: LabelledImages; evaluation: LabelledImages | undefined } {
  if (!Number.isSafeInteger(count) || count < 0 || count >= frames.count) {
    throw new RangeError(
      `option evalFrames is ${count}, expected an integer from 0 to ` +
        `${frames.count - 1} (fewer than the ${frames.count} frames)`,
    );
  }
  if (count === 0) return { training: frames, evaluation: undefined };
  const stride = frames.count / count;
  const held = new Set<number>();
  for (let i = 0; i < count; i++) held.add(Math.floor(i * stride));
  const rest: number[] = [];
  for (let i = 0; i < frames.count; i++) if (!held.has(i)) rest.push(i);
  return {
    training: subset(frames, rest),
    evaluation: subset(frames, [...held]),
  };
}

/** Options of {@link InferenceReporter}. */
export interface InferenceReporterOptions {
  vehicleId: string;
  tags: Record<string, string>;
  deployment: ModelDeployment;
  shadow: ShadowModel;
  /** Held-out labelled frames; undefined reports no accuracy. */
  frames: LabelledImages | undefined;
  /** Time between reports; 0 reports only after deployments. */
  intervalMs: number;
  /** Publishes an encoded report, retained. */
  publish: (bytes: Uint8Array) => Promise<void>;
  /** Rollout id of the candidate notice last acted on, or ''. */
  rolloutId: () => string;
  events: EventEmitter<AgentEvents>;
  log: Logger;
}

/** Times inferences, evaluates models and publishes reports. */
export class InferenceReporter {
  readonly stats = new InferenceStats();
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private again = false;
  private stopped = false;

  constructor(private readonly options: InferenceReporterOptions) {}

  /** Starts the report timer. */
  start(): void {
    if (this.options.intervalMs <= 0 || this.timer !== undefined) return;
    this.timer = setInterval(
      () => void this.refresh(),
      this.options.intervalMs,
    );
  }

  /** Stops the timer and waits for a report in progress. */
  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.timer);
    this.timer = undefined;
    await this.running;
  }

  /**
   * Classifies with the current model, timing the call and counting an
   * error against that model's version; in shadow mode the shadow model
   * classifies the same images afterwards, off the caller's path.
   */
  async classify(images: Float32Array, count: number): Promise<Float32Array> {
    const { deployment } = this.options;
    const model = deployment.current;
    if (model === undefined) return deployment.classify(images, count);
    const stats = this.stats.of(model);
    const started = performance.now();
    let probabilities: Float32Array;
    try {
      probabilities = await deployment.classifyWith(model, images, count);
    } catch (err) {
      stats.recordError(count);
      throw err;
    }
    const top = topOneOf(probabilities, count);
    stats.recordInference(performance.now() - started, top.confidences, count);
    void this.compareShadow(images, count, top.classIds);
    return probabilities;
  }

  /**
   * Evaluates the loaded models and publishes a report. Calls during a
   * run coalesce into one more run after it.
   */
  refresh(): Promise<void> {
    if (this.stopped) return Promise.resolve();
    if (this.running !== undefined) {
      this.again = true;
      return this.running;
    }
    this.running = this.runOnce().finally(() => {
      this.running = undefined;
      if (this.again && !this.stopped) {
        this.again = false;
        void this.refresh();
      }
    });
    return this.running;
  }

  private async runOnce(): Promise<void> {
    try {
      await this.evaluate();
      if (this.stopped) return;
      const report = this.buildReport();
      await this.options.publish(encodeVehicleReport(report));
      this.options.log.debug(
        { versions: report.versions.map((entry) => entry.version) },
        'inference report published',
      );
      this.options.events.emit('report-published', report);
    } catch (err) {
      this.options.log.warn({ err }, 'inference report not published');
    }
  }

  /** The current figures as a report. */
  buildReport(): VehicleReport {
    const { deployment, shadow } = this.options;
    return {
      vehicleId: this.options.vehicleId,
      createdAtMs: Date.now(),
      modelName: MODEL_NAME,
      tags: { ...this.options.tags },
      versions: this.stats.reportsOf({
        serving: deployment.current,
        previous: deployment.previous,
        shadow: shadow.model,
      }),
      rolloutId: this.options.rolloutId(),
    };
  }

  private async evaluate(): Promise<void> {
    const { deployment, frames } = this.options;
    const current = deployment.current;
    if (frames === undefined || current === undefined) return;
    const currentClasses = await this.evaluateModel(current, frames);
    const previous = deployment.previous;
    if (previous !== undefined) await this.evaluateModel(previous, frames);
    if (currentClasses !== undefined) {
      await this.evaluateShadow(frames, currentClasses);
    }
  }

  /**
   * Classifies each held-out frame alone, as a vehicle classifies one
   * camera crop at a time, and records latency, confidence and accuracy.
   * Returns the top-1 classes, or undefined when the model was unloaded
   * meanwhile.
   */
  private async evaluateModel(
    model: DeployedModel,
    frames: LabelledImages,
  ): Promise<Int32Array | undefined> {
    const stats = this.stats.of(model);
    const classIds = new Int32Array(frames.count);
    let correct = 0;
    for (let i = 0; i < frames.count; i++) {
      const image = frameOf(frames, i);
      const started = performance.now();
      let probabilities: Float32Array;
      try {
        probabilities = await this.options.deployment.classifyWith(
          model,
          image,
          1,
        );
      } catch (err) {
        stats.recordError(1);
        this.options.log.debug(
          { err, modelVersion: model.version },
          'evaluation stopped',
        );
        return undefined;
      }
      const top = topOneOf(probabilities, 1);
      stats.recordInference(performance.now() - started, top.confidences, 1);
      classIds[i] = top.classIds[0];
      if (top.classIds[0] === frames.labels[i]) correct += 1;
    }
    stats.recordEvaluation(frames.count, correct);
    return classIds;
  }

  private async evaluateShadow(
    frames: LabelledImages,
    currentClasses: Int32Array,
  ): Promise<void> {
    const { shadow } = this.options;
    let correct = 0;
    let agreed = 0;
    let model;
    for (let i = 0; i < frames.count; i++) {
      const started = performance.now();
      const result = await shadow.predict(frameOf(frames, i), 1);
      if (result === undefined) return;
      model = result.model;
      const top = topOneOf(result.probabilities, 1);
      const stats = this.stats.of(model);
      stats.recordInference(performance.now() - started, top.confidences, 1);
      if (top.classIds[0] === frames.labels[i]) correct += 1;
      if (top.classIds[0] === currentClasses[i]) agreed += 1;
    }
    if (model === undefined) return;
    const stats = this.stats.of(model);
    stats.recordEvaluation(frames.count, correct);
    stats.recordComparison(frames.count, agreed);
  }

  /** Runs the shadow model on classified images and counts agreement. */
  private async compareShadow(
    images: Float32Array,
    count: number,
    servedClasses: Int32Array,
  ): Promise<void> {
    try {
      const started = performance.now();
      const result = await this.options.shadow.predict(images, count);
      if (result === undefined) return;
      const top = topOneOf(result.probabilities, count);
      const stats = this.stats.of(result.model);
      stats.recordInference(
        performance.now() - started,
        top.confidences,
        count,
      );
      let agreed = 0;
      for (let i = 0; i < count; i++) {
        if (top.classIds[i] === servedClasses[i]) agreed += 1;
      }
      stats.recordComparison(count, agreed);
    } catch (err) {
      this.options.log.debug({ err }, 'shadow comparison failed');
    }
  }
}

function frameOf(frames: LabelledImages, index: number): Float32Array {
  return frames.images.slice(index * IMAGE_VALUES, (index + 1) * IMAGE_VALUES);
}
