/**
 * Model releases on the vehicle: verification, one deployment at a time,
 * releases held back during training, and waiting for a round's model.
 */
import type { EventEmitter } from 'node:events';
import { MODEL_NAME } from '../models/architecture.ts';
import {
  ErrorCode,
  FleetError,
  isFleetError,
  type Logger,
  type ModelRelease,
  type RoundTask,
} from '../protocol/index.ts';
import {
  verifyRelease,
  type DeployedModel,
  type ModelDeployment,
} from './deployment.ts';
import type { AgentCounters, AgentEvents } from './events.ts';

const MAX_TIMER_MS = 2 ** 31 - 1;

/** Callbacks and shared state the release handler uses. */
export interface ReleaseHandlerOptions {
  deployment: ModelDeployment;
  log: Logger;
  /** Counters the handler updates in place. */
  stats: AgentCounters;
  events: EventEmitter<AgentEvents>;
  /** True while the vehicle trains; releases then wait. */
  isTraining: () => boolean;
  /** Called after each deployment and rollback, to publish the status. */
  onModelChanged: () => Promise<void>;
}

/**
 * Deploys verified releases one at a time, in arrival order. A release
 * that arrives during training is held, and only the newest held release
 * is applied once training finishes, so a model never changes in the
 * middle of a training run.
 */
export class ReleaseHandler {
  private chain: Promise<void> = Promise.resolve();
  private heldRelease: ModelRelease | undefined;
  private readonly waiters = new Set<() => void>();
  private stopped = false;

  constructor(private readonly options: ReleaseHandlerOptions) {}

  /**
   * Verifies a decoded release and deploys it, or holds it during
   * training. A digest or size mismatch is logged at warn and the model in
   * service stays.
   */
  offer(release: ModelRelease): void {
    const { log } = this.options;
    try {
      verifyRelease(release);
    } catch (err) {
      this.reject(err, release.version);
      return;
    }
    if (this.options.isTraining()) {
      if ((this.heldRelease?.version ?? -1) < release.version) {
        this.heldRelease = release;
      }
      log.info(
        { modelVersion: release.version },
        'release held until training finishes',
      );
      return;
    }
    this.enqueue(() => this.apply(release));
  }

  /** Counts, logs and reports a release that was not deployed. */
  reject(err: unknown, version: number): void {
    const code = isFleetError(err) ? err.code : 'UNKNOWN';
    this.options.stats.releasesRejected += 1;
    this.options.log.warn(
      { err, modelVersion: version, code },
      'release rejected',
    );
    this.options.events.emit('release-rejected', { version, code });
  }

  /** Applies the release held during training, if any. */
  afterTraining(): void {
    const held = this.heldRelease;
    this.heldRelease = undefined;
    if (held !== undefined) this.enqueue(() => this.apply(held));
  }

  /** Resolves once the deployments queued so far have finished. */
  flush(): Promise<void> {
    return this.chain;
  }

  /**
   * Serves the previous model again, after queued deployments.
   *
   * @throws {FleetError} INVALID_MODEL when there is no previous model.
   */
  async rollback(): Promise<number> {
    const done = this.chain.then(() => this.options.deployment.rollback());
    this.chain = done.then(
      () => undefined,
      () => undefined,
    );
    const model = await done;
    this.options.log.warn({ modelVersion: model.version }, 'model rolled back');
    await this.options.onModelChanged();
    return model.version;
  }

  /** Stops deploying and releases every waiting round. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.heldRelease = undefined;
    this.wakeWaiters();
    await this.chain;
  }

  private enqueue(step: () => Promise<void>): void {
    // A failed step is logged and must not block the steps after it.
    this.chain = this.chain.then(step).catch((err: unknown) => {
      this.options.log.error({ err }, 'release handling failed');
    });
  }

  private async apply(release: ModelRelease): Promise<void> {
    const { deployment, log } = this.options;
    if (this.stopped) return;
    const current = deployment.current;
    const fields = { modelVersion: release.version };
    if (current !== undefined && release.version <= current.version) {
      log.debug(
        { ...fields, deployedVersion: current.version },
        'release not newer than deployed model ignored',
      );
      return;
    }
    if (release.modelName !== MODEL_NAME) {
      const message =
        `release names model ${release.modelName}, but this vehicle ` +
        `runs ${MODEL_NAME}`;
      this.reject(
        new FleetError(ErrorCode.InvalidModel, message),
        release.version,
      );
      return;
    }

    const started = Date.now();
    try {
      await deployment.deploy(release);
    } catch (err) {
      this.reject(err, release.version);
      return;
    }
    const durationMs = Date.now() - started;
    this.options.stats.releasesDeployed += 1;
    log.info(
      { ...fields, previousVersion: current?.version, durationMs },
      'release deployed',
    );
    this.options.events.emit('release-deployed', {
      version: release.version,
      sha256: release.sha256,
      previousVersion: current?.version,
      durationMs,
    });
    this.wakeWaiters();
    await this.options.onModelChanged();
  }

  /**
   * Waits until the model the task names (version and digest) is loaded,
   * bounded by the task's deadline (none when `deadlineMs` is 0). Returns
   * undefined when the deadline passes, the agent stops, or a model at
   * or above that version without the digest is in service, or `signal`
   * aborts.
   */
  async waitForModel(
    task: RoundTask,
    signal?: AbortSignal,
  ): Promise<DeployedModel | undefined> {
    const { deployment, log } = this.options;
    const fields = { round: task.round, modelVersion: task.modelVersion };
    for (;;) {
      await this.chain;
      const model = deployment.find(task.modelVersion, task.modelSha256);
      if (model !== undefined) return model;
      if (this.stopped || signal?.aborted === true) return undefined;

      const current = deployment.current;
      if (current !== undefined && current.version >= task.modelVersion) {
        log.warn(
          { ...fields, deployedVersion: current.version },
          'round model not available',
        );
        return undefined;
      }
      const remainingMs =
        task.deadlineMs > 0 ? task.deadlineMs - Date.now() : Infinity;
      if (remainingMs <= 0) {
        log.warn(fields, 'round deadline passed before its model arrived');
        return undefined;
      }
      await this.nextDeployment(remainingMs, signal);
    }
  }

  private nextDeployment(
    timeoutMs: number,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', wake);
        this.waiters.delete(wake);
        resolve();
      };
      signal?.addEventListener('abort', wake);
      // setTimeout fires at once above 2^31 - 1 ms; the caller loops.
      const timer = Number.isFinite(timeoutMs)
        ? setTimeout(wake, Math.min(timeoutMs, MAX_TIMER_MS))
        : undefined;
      this.waiters.add(wake);
    });
  }

  private wakeWaiters(): void {
    for (const wake of [...this.waiters]) wake();
  }
}
