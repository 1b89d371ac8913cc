/**
 * Round orchestration on the vehicle: which tasks to take, one training
 * run at a time, and the update it publishes.
 */
import type { EventEmitter } from 'node:events';
import { MODEL_NAME } from '../models/architecture.ts';
import type { TrainingBackend } from '../models/backend.ts';
import type { LabelledImages } from '../models/index.ts';
import {
  ErrorCode,
  FleetError,
  isFleetError,
  type Logger,
  decodeTensorValues,
  type ModelUpdate,
  type RoundTask,
  type SigningKey,
} from '../protocol/index.ts';
import { compressionOfTask } from '../protocol/compression/index.ts';
import type { DeployedModel } from './deployment.ts';
import { ErrorFeedback, compressTrainingOutput } from './error-feedback.ts';
import type { AgentEvents } from './events.ts';
import type { FeatureCache } from './feature-cache.ts';
import type { FinishedRounds } from './finished-rounds.ts';
import type { SecureParticipant } from './secure-participant.ts';
import {
  checkTrainingConfig,
  encodeUpdatePayload,
  trainForRound,
  type UpdateAttack,
} from './trainer.ts';

/** Rounds remembered as handled, and sent updates awaiting an ack. */
const MEMORY_SIZE = 64;

/** Callbacks and shared state the round runner uses. */
export interface RoundRunnerOptions {
  vehicleId: string;
  fleetId: string;
  frames: LabelledImages;
  backend: TrainingBackend;
  featureCache: FeatureCache;
  baseSeed: number;
  maxMessageBytes: number;
  /** Signs every update; undefined sends them unsigned. */
  signingKey?: SigningKey;
  /** Poisons every update; simulation and testing only. */
  attack?: UpdateAttack;
  log: Logger;
  /**
   * Resolves with the task's model once deployed, or undefined when it
   * cannot arrive or `signal` aborts.
   */
  waitForModel: (
    task: RoundTask,
    signal: AbortSignal,
  ) => Promise<DeployedModel | undefined>;
  /** Resolves once deployments already started have finished. */
  beforeTraining: () => Promise<void>;
  /** Applies a release that was held back during training. */
  afterTraining: () => void;
  /** Stores the update in the outbox, then publishes it with QoS 1. */
  publishUpdate: (
    payload: Uint8Array,
    update: { updateId: string; round: number },
  ) => Promise<void>;
  publishStatus: () => Promise<void>;
  /** Emitter of the agent's events. */
  events: EventEmitter<AgentEvents>;
  /** Rounds with a stored update, kept across restarts. */
  finishedRounds: FinishedRounds;
  /** Takes part in secure rounds instead of publishing updates. */
  secure: Pick<SecureParticipant, 'begin' | 'submit'>;
  /**
   * File of the top-k error feedback residual, in the state directory.
   * Without it the residual lives in memory and a restart loses it.
   */
  errorFeedbackFile?: string;
}

/** A published update awaiting its ack. */
export interface SentUpdate {
  round: number;
  baseModelVersion: number;
  sentAtMs: number;
}

function remember<K, V>(map: Map<K, V>, key: K, value: V): void {
  map.set(key, value);
  if (map.size > MEMORY_SIZE) map.delete(map.keys().next().value as K);
}

/**
 * Takes round tasks and trains on at most one at a time. A task that
 * arrives during a run waits, and only the newest waiting task is kept.
 * Handled rounds are remembered in memory only, so after a restart the
 * retained task of the open round trains again and the aggregator
 * rejects the second update if the first one was counted.
 */
export class RoundRunner {
  private running = false;
  /** Aborts the current run's wait for its model. */
  private waitAbort: AbortController | undefined;
  private training = false;
  private stopped = false;
  /** Aborts training between steps once the runner stops. */
  private readonly stopAbort = new AbortController();
  /** The run in progress; it never rejects. */
  private currentRun: Promise<void> | undefined;
  private waitingTask: RoundTask | undefined;
  private readonly handledRounds = new Map<string, true>();
  private readonly sentUpdates = new Map<string, SentUpdate>();
  private readonly errorFeedback: ErrorFeedback;

  constructor(private readonly options: RoundRunnerOptions) {
    this.errorFeedback = new ErrorFeedback(
      options.errorFeedbackFile,
      options.log,
    );
  }

  /** True while features are computed or the model trains. */
  get isTraining(): boolean {
    return this.training;
  }

  /**
   * Stops taking tasks and aborts training at its next step, so a run in
   * progress publishes nothing more. Resolves once that run has ended.
   * NOTE: feature extraction in onnxruntime cannot be aborted, so a run
   * still extracting features ends only after the extraction.
   */
  stop(): Promise<void> {
    this.stopped = true;
    this.waitingTask = undefined;
    this.stopAbort.abort();
    return this.currentRun ?? Promise.resolve();
  }

  /** Removes and returns the sent update with this id, if known. */
  takeSentUpdate(updateId: string): SentUpdate | undefined {
    const sent = this.sentUpdates.get(updateId);
    this.sentUpdates.delete(updateId);
    return sent;
  }

  /** Considers a decoded round task. */
  offer(task: RoundTask): void {
    const { log, vehicleId, fleetId } = this.options;
    if (this.stopped) return;
    const fields = { round: task.round, modelVersion: task.modelVersion };
    if (task.fleetId !== fleetId) {
      log.warn(
        { ...fields, taskFleetId: task.fleetId },
        'round task for another fleet ignored',
      );
      return;
    }
    const selected =
      task.selectedVehicles.length === 0 ||
      task.selectedVehicles.includes(vehicleId);
    if (!selected) {
      log.debug(fields, 'vehicle not selected for round');
      return;
    }
    const key = roundKey(task);
    if (this.handledRounds.has(key) || this.options.finishedRounds.has(key)) {
      log.debug(fields, 'round already handled');
      return;
    }
    // Keys go out at once: the key phase does not wait for training.
    if (task.secureAggregation) this.options.secure.begin(task);
    if (this.running) {
      this.waitingTask = task;
      log.info(fields, 'round task waits for the current run');
      // A newer round supersedes one still waiting for its model.
      if (!this.training) this.waitAbort?.abort();
      return;
    }
    this.currentRun = this.run(task);
  }

  private async run(task: RoundTask): Promise<void> {
    this.running = true;
    this.waitAbort = new AbortController();
    remember(this.handledRounds, roundKey(task), true);
    try {
      const model = await this.prepare(task);
      if (model !== undefined && !this.stopped) await this.train(task, model);
    } catch (err) {
      this.options.log.error({ err, round: task.round }, 'round task failed');
    } finally {
      this.running = false;
      this.waitAbort = undefined;
      this.currentRun = undefined;
      const next = this.waitingTask;
      this.waitingTask = undefined;
      if (next !== undefined) this.offer(next);
    }
  }

  /** Checks the task and waits for its model; undefined means skip. */
  private async prepare(task: RoundTask): Promise<DeployedModel | undefined> {
    const { log } = this.options;
    const fields = { round: task.round, modelVersion: task.modelVersion };
    if (task.deadlineMs > 0 && Date.now() >= task.deadlineMs) {
      log.info(fields, 'round deadline already passed');
      return undefined;
    }
    try {
      if (task.modelName !== MODEL_NAME) {
        throw new FleetError(
          ErrorCode.WrongModelVersion,
          `round task names model ${task.modelName}, but this vehicle ` +
            `runs ${MODEL_NAME}`,
        );
      }
      checkTrainingConfig(task.training);
      compressionOfTask(task);
    } catch (err) {
      const code = isFleetError(err) ? err.code : undefined;
      log.warn({ ...fields, err, code }, 'round task rejected');
      return undefined;
    }
    const model = await this.options.waitForModel(task, this.waitAbort!.signal);
    if (this.waitAbort?.signal.aborted === true) {
      log.info(fields, 'round superseded before its model arrived');
      return undefined;
    }
    return model;
  }

  private async train(task: RoundTask, model: DeployedModel): Promise<void> {
    const { log, events } = this.options;
    const fields = { round: task.round, modelVersion: model.version };
    this.training = true;
    events.emit('training-started', fields);
    // Not awaited: offline, the status waits for the next connection, and
    // training must not.
    void this.options.publishStatus();
    const started = Date.now();
    let succeeded = false;
    try {
      await this.options.beforeTraining();
      succeeded = await this.trainAndPublish(task, model);
    } catch (err) {
      if (this.stopped) {
        log.info(fields, 'round training aborted by stop');
      } else {
        const code = isFleetError(err) ? err.code : undefined;
        log.error({ ...fields, err, code }, 'round training failed');
      }
    } finally {
      this.training = false;
      const durationMs = Date.now() - started;
      // The held release is queued first but deploys asynchronously, so
      // 'training-finished' still comes before 'release-deployed'.
      this.options.afterTraining();
      events.emit('training-finished', { ...fields, durationMs, succeeded });
      void this.options.publishStatus();
    }
  }

  private async trainAndPublish(
    task: RoundTask,
    model: DeployedModel,
  ): Promise<boolean> {
    const { log, frames } = this.options;
    log.info(
      {
        round: task.round,
        modelVersion: model.version,
        numExamples: frames.count,
        trainableTensors: task.training.trainableTensors,
      },
      'local training started',
    );
    const output = await trainForRound({
      task,
      model,
      frames,
      featureCache: this.options.featureCache,
      vehicleId: this.options.vehicleId,
      baseSeed: this.options.baseSeed,
      backend: this.options.backend,
      maxMessageBytes: this.options.maxMessageBytes,
      signingKey: this.options.signingKey,
      attack: this.options.attack,
      signal: this.stopAbort.signal,
    });
    if (this.stopped) return false;
    if (task.secureAggregation) {
      return this.submitSecure(task, output.update, output.result);
    }

    // NOTE: trainForRound checks maxMessageBytes on the float32 payload,
    // so an update that fits only once compressed is rejected there.
    const { update, payload, result } = await compressTrainingOutput(
      output,
      task,
      this.errorFeedback,
      (changed) =>
        encodeUpdatePayload(
          changed,
          this.options.maxMessageBytes,
          this.options.signingKey,
        ),
    );
    // Recorded before the outbox write, so a restart does not train this
    // round again. NOTE: if the outbox write then fails, the round's
    // update is lost, and the error is logged by the caller.
    await this.options.finishedRounds
      .add(roundKey(task))
      .catch((err: unknown) =>
        log.warn({ err, round: task.round }, 'finished round not recorded'),
      );
    // Recorded first, because the ack can arrive before the PUBACK.
    remember(this.sentUpdates, update.updateId, {
      round: update.round,
      baseModelVersion: update.baseModelVersion,
      sentAtMs: Date.now(),
    });
    try {
      await this.options.publishUpdate(payload, update);
    } catch (err) {
      this.sentUpdates.delete(update.updateId);
      throw err;
    }
    log.info(
      {
        round: update.round,
        modelVersion: update.baseModelVersion,
        updateId: update.updateId,
        numExamples: update.numExamples,
        bytes: payload.length,
        loss: result.loss,
        accuracy: result.accuracy,
        durationMs: Math.round(result.durationMs),
      },
      'update sent',
    );
    this.options.events.emit('update-sent', {
      updateId: update.updateId,
      round: update.round,
      baseModelVersion: update.baseModelVersion,
      numExamples: update.numExamples,
      bytes: payload.length,
      trainLoss: result.loss,
      trainAccuracy: result.accuracy,
    });
    return true;
  }

  /** Hands a secure round's update to the participant, which masks it. */
  private async submitSecure(
    task: RoundTask,
    update: ModelUpdate,
    result: { loss: number; accuracy: number },
  ): Promise<boolean> {
    const { log } = this.options;
    await this.options.finishedRounds
      .add(roundKey(task))
      .catch((err: unknown) =>
        log.warn({ err, round: task.round }, 'finished round not recorded'),
      );
    const taken = this.options.secure.submit(
      task,
      deltasOf(update),
      update.numExamples,
    );
    log.info(
      {
        round: task.round,
        modelVersion: update.baseModelVersion,
        numExamples: update.numExamples,
        loss: result.loss,
        accuracy: result.accuracy,
        taken,
      },
      'secure update handed to masking',
    );
    return taken;
  }
}

/** Deltas of an update by tensor name, in float32. */
function deltasOf(update: ModelUpdate): Map<string, Float32Array> {
  return new Map(
    update.deltas.map((tensor) => [tensor.name, decodeTensorValues(tensor)]),
  );
}

/**
 * Returns the key of a round. The open time separates two rounds with the
 * same number, as a reset aggregator may produce.
 */
function roundKey(task: RoundTask): string {
  return `${task.round}@${task.openedAtMs}`;
}
