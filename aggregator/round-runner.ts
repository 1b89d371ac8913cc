/**
 * Round orchestration: wait for vehicles, select them, open a round with
 * a deadline, then turn the closed round into a new model version or a
 * failed round. MQTT publishing and events go through a RoundHost.
 */
import type { EventEmitter } from 'node:events';
import { setTimeout as delay } from 'node:timers/promises';
import {
  ErrorCode,
  countElements,
  encodeRoundTask,
  isFleetError,
  type Logger,
  type SecureAggregationConfig,
} from '../protocol/index.ts';
import {
  MODEL_NAME,
  TENSOR_SPECS,
  type WeightMap,
} from '../models/architecture.ts';
import type {
  AggregatorEvents,
  RoundNormBound,
  RoundPrivacy,
} from './events.ts';
import { buildRoundTask } from './messages.ts';
import type { ModelStore, StoredModel } from './model-store.ts';
import type { ResolvedOptions } from './options.ts';
import {
  PrivacyAccountant,
  noisyMeanOf,
  samplingRateOf,
} from './privacy-round.ts';
import { secureConfigFor } from './secure-options.ts';
import { SecureRoundSession, type SecureOutcome } from './secure-round.ts';
import {
  checkSecureSum,
  quantizationOf,
  splitSecureSum,
} from '../secure-aggregation/update-vector.ts';
import { OpenRound, type CloseTrigger, type RoundStats } from './round.ts';
import { boundRoundUpdates } from './round-norm-bound.ts';
import { ServerStep } from './server-step.ts';
import { selectVehicles } from './selection.ts';
import { saveState } from './state.ts';
import { commitRound, type CommittedVersion } from './versions.ts';
import { waitForVehicles, type VehicleRegistry } from './vehicles.ts';

/** Interface between the runner and the aggregator process. */
export interface RoundHost {
  readonly options: ResolvedOptions;
  readonly log: Logger;
  readonly store: ModelStore;
  readonly vehicles: VehicleRegistry;
  /** Aborted by `stop()`. */
  readonly signal: AbortSignal;
  /** Publishes the retained RoundTask. The host logs publish failures. */
  publishRoundTask(bytes: Uint8Array, round: number): void;
  /** Publishes to a vehicle's secure inbox with QoS 1; logs failures. */
  publishSecure(vehicleId: string, bytes: Uint8Array): void;
  /** Routes incoming secure messages to `session`; undefined drops them. */
  setSecureSession(session: SecureRoundSession | undefined): void;
  /** Publishes the retained release of `model`. */
  publishRelease(model: StoredModel, bytes: Uint8Array): Promise<void>;
  /**
   * With stagedReleases: resolves true when the next round may train
   * from `model`, false when the runner must end (see staged-release.ts).
   */
  awaitFleetRelease?(model: StoredModel): Promise<boolean>;
  /** The aggregator's `emit`. */
  emit: EventEmitter<AggregatorEvents>['emit'];
  /** Called after every closed or failed round and when the loop ends. */
  onRoundEnded(): void;
}

/** Sizes of the trainable tensors, by name. */
function tensorSizesOf(names: readonly string[]): Map<string, number> {
  const sizes = new Map<string, number>();
  for (const spec of TENSOR_SPECS) {
    if (names.includes(spec.name))
      sizes.set(spec.name, countElements(spec.shape));
  }
  return sizes;
}

/** Runs rounds one after another until maxRounds or abort. */
export class RoundRunner {
  readonly #host: RoundHost;
  readonly #tensorSizes: Map<string, number>;
  #model: StoredModel;
  #lastRound: number;
  #openRound: OpenRound | undefined;
  #roundsCompleted = 0;
  /** DP-FedAvg accountant; undefined without differentialPrivacy. */
  readonly #accountant: PrivacyAccountant | undefined;
  /** Sampling rate of the open round, for the accountant. */
  #samplingRate = 1;
  #isBudgetSpent = false;
  /** Server optimizer; undefined without the serverOptimizer option. */
  readonly #serverStep: ServerStep | undefined;

  /**
   * @throws {FleetError} INVALID_CONFIG when stateDir/privacy.json exists
   *   but is not a privacy budget, or stateDir/server-optimizer.json does
   *   not match the serverOptimizer option.
   */
  constructor(host: RoundHost, model: StoredModel, lastRound: number) {
    this.#host = host;
    this.#model = model;
    this.#lastRound = lastRound;
    this.#tensorSizes = tensorSizesOf(host.options.trainableTensors);
    const dp = host.options.differentialPrivacy;
    this.#accountant =
      dp === undefined
        ? undefined
        : new PrivacyAccountant(host.options.stateDir, dp);
    const optimizer = host.options.serverOptimizer;
    // A new runner after a rollback starts from an older version, so its
    // ServerStep resets the moments (see server-step.ts).
    this.#serverStep =
      optimizer === undefined
        ? undefined
        : ServerStep.open({
            stateDir: host.options.stateDir,
            config: optimizer,
            tensorSizes: this.#tensorSizes,
            modelVersion: model.manifest.version,
            log: host.log,
          });
  }

  /** True once the loop stopped because the privacy budget is spent. */
  get isBudgetSpent(): boolean {
    return this.#isBudgetSpent;
  }

  /** Epsilon spent so far, or undefined without differentialPrivacy. */
  get epsilon(): number | undefined {
    return this.#accountant?.epsilon;
  }

  get model(): StoredModel {
    return this.#model;
  }

  /** The open round, or the last one opened. */
  get lastRound(): number {
    return this.#lastRound;
  }

  /** The round of the last RoundTask, until its outcome is known. */
  get openRound(): OpenRound | undefined {
    return this.#openRound;
  }

  get roundsCompleted(): number {
    return this.#roundsCompleted;
  }

  get isRoundLimitReached(): boolean {
    const { maxRounds } = this.#host.options;
    return maxRounds > 0 && this.#roundsCompleted >= maxRounds;
  }

  /** Closes the open round without a new version, for `stop()`. */
  abandonOpenRound(): void {
    this.#openRound?.close('stopped');
  }

  /** Runs rounds until maxRounds is reached or the host's signal aborts. */
  async run(): Promise<void> {
    const { options, log, signal } = this.#host;
    while (!signal.aborted && !this.isRoundLimitReached) {
      if ((await this.#host.awaitFleetRelease?.(this.#model)) === false) {
        break;
      }
      const online = await waitForVehicles(this.#host.vehicles, {
        target: Math.max(options.minVehiclesOnline, options.minUpdates),
        minimum: options.minUpdates,
        timeoutMs: options.onlineWaitTimeoutMs,
        signal,
        log,
      });
      if (online === undefined) break;
      if (this.#checkBudgetSpent(online)) break;
      try {
        await this.#runRound(online);
      } catch (err) {
        // A failure outside a round's own error handling, for example a
        // state.json write error. Pause so that it does not spin.
        log.error({ err, round: this.#lastRound }, 'round loop failed');
        await delay(1000, undefined, { signal }).catch(() => undefined);
      }
    }
    if (this.isRoundLimitReached) {
      log.info({ rounds: this.#roundsCompleted }, 'max rounds reached');
    }
    this.#host.onRoundEnded();
  }

  /**
   * Returns true, after logging, when one more round at this round's
   * sampling rate would take epsilon above the target.
   */
  #checkBudgetSpent(online: string[]): boolean {
    const accountant = this.#accountant;
    if (accountant === undefined) return false;
    const selected = this.#select(online, this.#lastRound + 1);
    const samplingRate = samplingRateOf(selected.length, online.length);
    const { exceeds, epsilonAfter } = accountant.wouldExceed(samplingRate);
    if (!exceeds) return false;
    this.#isBudgetSpent = true;
    this.#host.log.warn(
      {
        epsilon: accountant.epsilon,
        epsilonAfter,
        targetEpsilon: accountant.settings.targetEpsilon,
        rounds: accountant.rounds,
        samplingRate,
      },
      'privacy budget spent',
    );
    return true;
  }

  #select(online: string[], roundNumber: number): string[] {
    const { options } = this.#host;
    return selectVehicles(
      online,
      options.vehiclesPerRound,
      options.seed,
      roundNumber,
    );
  }

  async #runRound(online: string[]): Promise<void> {
    const { options } = this.#host;
    const roundNumber = this.#lastRound + 1;
    const baseModelVersion = this.#model.manifest.version;
    const selected = this.#select(online, roundNumber);
    this.#samplingRate = samplingRateOf(selected.length, online.length);
    // Record the round number first, so a restart never reuses it.
    saveState(options.stateDir, {
      round: roundNumber,
      modelVersion: baseModelVersion,
    });
    const round = new OpenRound({
      round: roundNumber,
      baseModelVersion,
      selected,
      tensorSizes: this.#tensorSizes,
      timeoutMs: options.roundTimeoutMs,
      keepUpdates:
        options.aggregation !== 'fedavg' || options.normBound !== undefined,
      // In secure rounds the vehicles clip, before masking.
      clipNorm:
        options.secureAggregation === undefined
          ? options.differentialPrivacy?.clipNorm
          : undefined,
      asyncBuffer: options.asyncBuffer,
    });
    this.#lastRound = roundNumber;
    this.#openRound = round;

    const secure = options.secureAggregation;
    if (secure !== undefined) {
      const config = secureConfigFor(
        selected,
        secure,
        options.trainableTensors,
        (id) => this.#host.vehicles.examplesOf(id),
        options.maxExamplesPerUpdate,
      );
      await this.#runSecureRound(round, config);
      return;
    }
    this.#announceRound(round);
    const trigger = await round.closed;
    if (trigger === 'stopped') {
      this.#host.log.info({ round: roundNumber }, 'round abandoned at stop');
      return;
    }
    await this.#finishRound(round, trigger);
  }

  #announceRound(round: OpenRound, secure?: SecureAggregationConfig): void {
    const { options, log } = this.#host;
    const sha256 = this.#model.manifest.sha256;
    const task = buildRoundTask(round, options, MODEL_NAME, sha256);
    if (secure !== undefined) task.secureAggregation = secure;
    if (options.asyncBuffer !== undefined) {
      // Any vehicle may train and send; the buffer closes the round.
      task.selectedVehicles = [];
    }
    log.info(
      {
        round: round.round,
        modelVersion: round.baseModelVersion,
        selected: round.selected.size,
        deadlineMs: round.deadlineMs,
      },
      'round opened',
    );
    // The event goes first, because vehicles may send updates before the
    // publish resolves.
    this.#host.emit('round-opened', {
      round: round.round,
      modelVersion: round.baseModelVersion,
      selected: task.selectedVehicles,
      deadlineMs: round.deadlineMs,
    });
    const bytes = encodeRoundTask(task, options.maxMessageBytes);
    this.#host.publishRoundTask(bytes, round.round);
  }

  /**
   * Runs the secure phases of `round`, then commits its unmasked mean, or
   * fails the round when too few vehicles remain in a phase.
   */
  async #runSecureRound(
    round: OpenRound,
    config: SecureAggregationConfig,
  ): Promise<void> {
    const { options, log, signal } = this.#host;
    const session = new SecureRoundSession(
      {
        log,
        fleetId: options.fleetId,
        maxMessageBytes: options.maxMessageBytes,
        publishToVehicle: (id, bytes) => this.#host.publishSecure(id, bytes),
      },
      {
        round: round.round,
        openedAtMs: round.openedAtMs,
        selected: [...round.selected],
        config,
        tensorSizes: config.tensorNames.map((n) => this.#tensorSizes.get(n)!),
        maskDeadlineMs: round.deadlineMs,
        phaseTimeoutMs: options.secureAggregation!.phaseTimeoutMs,
        signal,
        onPhase: (phase, expected) =>
          this.#host.emit('secure-phase', {
            round: round.round,
            phase,
            expected: [...expected].sort(),
          }),
      },
    );
    // The session takes messages before the task goes out, so that no
    // key advertisement arrives before it.
    this.#host.setSecureSession(session);
    const running = session.run();
    // Marked handled: if announcing throws, the error below is that one.
    running.catch(() => undefined);
    let outcome: SecureOutcome;
    try {
      this.#announceRound(round, config);
      outcome = await running;
    } catch (err) {
      if (signal.aborted) {
        round.close('stopped');
        log.info({ round: round.round }, 'round abandoned at stop');
        return;
      }
      round.close('deadline');
      this.#failRound(round.stats(), 'deadline', err);
      return;
    } finally {
      this.#host.setSecureSession(undefined);
    }

    let mean;
    try {
      mean = this.#secureMean(outcome, config, round.selected.size);
    } catch (err) {
      round.close('deadline');
      this.#failRound(round.stats(), 'deadline', err);
      return;
    }
    round.recordSecureAggregate({
      mean,
      vehicleIds: outcome.survivorIds,
      numExamples: mean.numExamples,
      uplinkBytes: outcome.uplinkBytes,
    });
    const trigger: CloseTrigger =
      outcome.survivorIds.length === round.selected.size
        ? 'all-responded'
        : 'deadline';
    round.close(trigger);
    log.info(
      {
        round: round.round,
        survivors: outcome.survivorIds.length,
        dropped: outcome.droppedIds,
      },
      'secure round unmasked',
    );
    await this.#finishRound(round, trigger);
  }

  /**
   * The mean delta of a secure round: FedAvg's weighted mean, or with
   * differential privacy the noisy mean of the equal-weight sum.
   */
  #secureMean(
    outcome: SecureOutcome,
    config: SecureAggregationConfig,
    selectedCount: number,
  ): WeightMap & { numExamples: number } {
    const dp = this.#host.options.differentialPrivacy;
    const tensors = config.tensorNames.map((name) => ({
      name,
      size: this.#tensorSizes.get(name)!,
    }));
    checkSecureSum(
      outcome.sum,
      config,
      outcome.survivorIds.length,
      quantizationOf(config).step,
    );
    const { deltas, weightSum } = splitSecureSum(
      outcome.sum,
      tensors,
      dp === undefined,
    );
    const mean =
      dp === undefined
        ? deltas
        : noisyMeanOf(deltas, selectedCount, dp, this.#lastRound);
    // With a cap, the weights sum to examples / cap. Without one (DP),
    // the survivors' reported statuses give the examples when all have one.
    const reported = outcome.survivorIds.map((id) =>
      this.#host.vehicles.examplesOf(id),
    );
    const numExamples =
      config.exampleCap !== 0
        ? Math.round(weightSum * config.exampleCap)
        : reported.every((count) => count !== undefined)
          ? reported.reduce((total: number, count) => total + count!, 0)
          : Math.round(weightSum);
    return Object.assign(mean, { numExamples });
  }

  async #finishRound(round: OpenRound, trigger: CloseTrigger): Promise<void> {
    const { options, store, log } = this.#host;
    let committed: CommittedVersion;
    let normBound: RoundNormBound | undefined;
    try {
      const bounded = boundRoundUpdates(round, options, log);
      normBound = bounded?.summary;
      committed = await commitRound(round, this.#model, store, options, {
        boundedUpdates: bounded?.updates,
        serverStep: this.#serverStep,
      });
    } catch (err) {
      this.#failRound(round.stats(), trigger, err);
      return;
    }

    const { model, release, exportMaxAbsDiff } = committed;
    this.#model = model;
    this.#openRound = undefined;
    // privacy.json is written before the release goes out, so the budget
    // on disk never counts fewer rounds than were published.
    const privacy = this.#recordPrivacy(round);
    await this.#host.publishRelease(model, release).catch((err: unknown) => {
      const modelVersion = model.manifest.version;
      log.error({ err, modelVersion }, 'release publish failed');
    });

    // Stats again, so that durationMs includes export and publishing.
    const stats = round.stats();
    const accuracy = model.manifest.testAccuracy ?? undefined;
    log.info(
      {
        round: stats.round,
        modelVersion: model.manifest.version,
        trigger,
        accepted: stats.accepted,
        rejected: stats.rejected,
        numExamples: stats.numExamples,
        accuracy,
        durationMs: stats.durationMs,
        ...privacy,
        normRejected: normBound?.rejected,
        normClipped: normBound?.clipped,
        serverStep: this.#serverStep?.step,
      },
      'round closed',
    );
    this.#roundsCompleted += 1;
    this.#host.emit('round-closed', {
      ...stats,
      modelVersion: model.manifest.version,
      accuracy,
      epsilon: privacy?.epsilon,
      privacy,
      normBound,
      releaseBytes: release.byteLength,
      exportMaxAbsDiff,
    });
    this.#host.onRoundEnded();
  }

  /** Steps the accountant for a released round; undefined without DP. */
  #recordPrivacy(round: OpenRound): RoundPrivacy | undefined {
    const accountant = this.#accountant;
    const sum = round.clippedSum;
    if (accountant === undefined) return undefined;
    if (sum === undefined && round.secureMean === undefined) return undefined;
    const epsilon = accountant.step(this.#samplingRate);
    return {
      epsilon,
      samplingRate: this.#samplingRate,
      clippedUpdates: sum?.clippedCount,
      medianUpdateNorm: sum === undefined ? undefined : (sum.medianNorm ?? 0),
    };
  }

  #failRound(stats: RoundStats, trigger: CloseTrigger, err: unknown): void {
    this.#openRound = undefined;
    const reasonCode = isFleetError(err) ? err.code : 'INTERNAL_ERROR';
    const message = err instanceof Error ? err.message : String(err);
    const modelVersion = this.#model.manifest.version;
    const fields = {
      round: stats.round,
      modelVersion,
      trigger,
      code: reasonCode,
      accepted: stats.accepted,
      rejected: stats.rejected,
    };
    // Too few updates (for the quorum or for a robust rule) is the fleet's
    // fault, so it is a warning. Any other failure is the aggregator's own.
    if (
      reasonCode === ErrorCode.QuorumNotMet ||
      reasonCode === ErrorCode.RobustRuleUnsatisfied
    ) {
      this.#host.log.warn(fields, 'round failed');
    } else {
      this.#host.log.error({ ...fields, err }, 'round failed');
    }
    this.#roundsCompleted += 1;
    this.#host.emit('round-failed', {
      ...stats,
      modelVersion,
      reasonCode,
      message,
    });
    this.#host.onRoundEnded();
  }
}
