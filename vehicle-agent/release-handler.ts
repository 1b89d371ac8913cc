/**
 * Model releases on the vehicle: which notices to act on, chunked
 * downloads, one deployment at a time, releases held back during
 * training, rollbacks the fleet announces, and waiting for a round's
 * model.
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
import type { DeployedModel, ModelDeployment } from './deployment.ts';
import type { AgentCounters, AgentEvents } from './events.ts';
import type { ReleaseDownloader } from './release-download.ts';
import { MAX_TIMER_MS } from '../protocol/mqtt-end.ts';

/** Callbacks and shared state the release handler uses. */
export interface ReleaseHandlerOptions {
  deployment: ModelDeployment;
  downloads: ReleaseDownloader;
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
 * A release ready to serve: a downloaded file, or the kept previous
 * model that a rollback notice names.
 */
type ReadyRelease =
  | { kind: 'file'; release: ModelRelease; onnx: Uint8Array }
  | { kind: 'previous'; release: ModelRelease };

/** Identity of a model: version and digest. */
function keyOf(model: { version: number; sha256: string }): string {
  return `${model.version}:${model.sha256.toLowerCase()}`;
}

function isSameModel(
  a: { version: number; sha256: string } | undefined,
  b: { version: number; sha256: string },
): boolean {
  return a !== undefined && keyOf(a) === keyOf(b);
}

/**
 * Acts on release notices. The latest notice is the fleet's current
 * release, also when its version is lower than the one in service (a
 * rollback): the kept previous model is served again when it matches,
 * otherwise the release is downloaded. Deployments run one at a time, in
 * arrival order. A release that becomes ready during training is held,
 * and only the latest one is applied once training finishes, so a model
 * never changes in the middle of a training run.
 */
export class ReleaseHandler {
  private chain: Promise<void> = Promise.resolve();
  private heldRelease: ReadyRelease | undefined;
  /** The latest notice offered. */
  private latest: ModelRelease | undefined;
  /** Releases that failed download or deployment, by version and digest. */
  private readonly rejected = new Set<string>();
  /** Release last logged as held, by version and digest. */
  private heldLogged: string | undefined;
  private readonly waiters = new Set<() => void>();
  private stopped = false;

  constructor(private readonly options: ReleaseHandlerOptions) {}

  /**
   * Acts on a decoded release notice: ignores the model in service,
   * switches back to the kept previous model, or downloads the release.
   * A release that failed before is tried again, because the aggregator
   * may have published its chunks again; verified chunks stay on disk.
   */
  offer(release: ModelRelease): void {
    if (this.stopped) return;
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
    this.latest = release;
    this.rejected.delete(keyOf(release));
    // A round waiting for a model checks it against the new notice.
    this.wakeWaiters();
    if (this.options.isTraining()) this.logHeld(release);
    this.enqueue(async () => this.consider(release));
  }

  /** Hands a message on a chunk topic to the downloader. */
  handleChunk(version: number, index: number, payload: Uint8Array): void {
    if (!this.stopped) {
      this.options.downloads.handleChunk(version, index, payload);
    }
  }

  /** Requests missing chunks again after a (re)connection. */
  onConnected(): void {
    if (!this.stopped) this.options.downloads.onConnected();
  }

  /** Counts, logs and reports a release that was not deployed. */
  reject(err: unknown, version: number): void {
    const code = isFleetError(err) ? err.code : 'UNKNOWN';
    const { stats } = this.options;
    stats.releasesRejected += 1;
    stats.releasesRejectedByCode[code] =
      (stats.releasesRejectedByCode[code] ?? 0) + 1;
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
    this.heldLogged = undefined;
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

  /** Stops downloading and deploying and releases every waiting round. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.heldRelease = undefined;
    this.options.downloads.stop();
    this.wakeWaiters();
    await this.chain;
  }

  private enqueue(step: () => Promise<void>): void {
    // A failed step is logged and must not block the steps after it.
    this.chain = this.chain.then(step).catch((err: unknown) => {
      this.options.log.error({ err }, 'release handling failed');
    });
  }

  private isLatest(release: ModelRelease): boolean {
    return this.latest === undefined || isSameModel(this.latest, release);
  }

  /** Decides what a notice needs, once earlier deployments are done. */
  private consider(release: ModelRelease): void {
    const { deployment, downloads, log } = this.options;
    if (this.stopped || !this.isLatest(release)) return;
    const current = deployment.current;
    const fields = { modelVersion: release.version };
    if (isSameModel(current, release)) {
      downloads.discardAll();
      log.debug(fields, 'release already deployed');
      return;
    }
    if (current !== undefined && release.version === current.version) {
      // NOTE: a version number the aggregator issued twice, for example
      // after its state directory was deleted, is not deployed again.
      log.warn(
        { ...fields, sha256: release.sha256, deployedSha256: current.sha256 },
        'release with deployed version but other digest ignored',
      );
      return;
    }
    if (isSameModel(deployment.previous, release)) {
      downloads.discardAll();
      this.ready({ kind: 'previous', release });
      return;
    }
    void this.download(release);
  }

  private async download(release: ModelRelease): Promise<void> {
    let onnx: Uint8Array | undefined;
    try {
      onnx = await this.options.downloads.fetch(release);
    } catch (err) {
      this.rejected.add(keyOf(release));
      this.reject(err, release.version);
      this.wakeWaiters();
      return;
    }
    if (onnx !== undefined && !this.stopped) {
      this.ready({ kind: 'file', release, onnx });
    }
  }

  private ready(item: ReadyRelease): void {
    if (this.options.isTraining()) {
      this.heldRelease = item;
      this.logHeld(item.release);
      return;
    }
    this.enqueue(() => this.apply(item));
  }

  /**
   * Logs once per training run that a release waits for it to finish:
   * when its notice arrives during training, or its download ends then.
   */
  private logHeld(release: ModelRelease): void {
    if (this.heldLogged === keyOf(release)) return;
    this.heldLogged = keyOf(release);
    this.options.log.info(
      { modelVersion: release.version },
      'release held until training finishes',
    );
  }

  private async apply(item: ReadyRelease): Promise<void> {
    const { deployment, downloads, log } = this.options;
    const { release } = item;
    if (this.stopped) return;
    const current = deployment.current;
    if (!this.isLatest(release) || isSameModel(current, release)) {
      log.debug(
        { modelVersion: release.version },
        'superseded release not deployed',
      );
      return;
    }

    const started = Date.now();
    try {
      if (item.kind === 'file') {
        await deployment.deploy({ ...release, onnx: item.onnx });
        await downloads.remove(release);
      } else if (isSameModel(deployment.previous, release)) {
        await deployment.rollback();
      } else {
        // The kept previous model changed since the notice arrived.
        void this.download(release);
        return;
      }
    } catch (err) {
      this.rejected.add(keyOf(release));
      this.reject(err, release.version);
      this.wakeWaiters();
      return;
    }
    this.reportDeployed(release, current, Date.now() - started);
    await this.options.onModelChanged();
  }

  private reportDeployed(
    release: ModelRelease,
    replaced: DeployedModel | undefined,
    durationMs: number,
  ): void {
    this.options.stats.releasesDeployed += 1;
    const isRollback =
      replaced !== undefined && release.version < replaced.version;
    this.options.log.info(
      {
        modelVersion: release.version,
        previousVersion: replaced?.version,
        rollback: isRollback,
        durationMs,
      },
      'release deployed',
    );
    this.options.events.emit('release-deployed', {
      version: release.version,
      sha256: release.sha256,
      previousVersion: replaced?.version,
      durationMs,
    });
    this.wakeWaiters();
  }

  /**
   * Waits until the model the task names (version and digest) is loaded,
   * bounded by the task's deadline (none when `deadlineMs` is 0). Returns
   * undefined when the deadline passes, the agent stops, `signal` aborts,
   * or the model cannot arrive: its release was rejected, or a model at or
   * above that version is in service and the latest notice names another.
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

      if (!this.isAwaited(task)) {
        log.warn(
          { ...fields, deployedVersion: deployment.current?.version },
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

  /** Returns whether the model of `task` may still be deployed. */
  private isAwaited(task: RoundTask): boolean {
    const expected = { version: task.modelVersion, sha256: task.modelSha256 };
    if (this.rejected.has(keyOf(expected))) return false;
    if (isSameModel(this.latest, expected)) return true;
    const current = this.options.deployment.current;
    return current === undefined || current.version < task.modelVersion;
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
