import { EventEmitter } from 'node:events';
import { connect, type MqttClient } from 'mqtt';
import {
  ErrorCode,
  FleetError,
  FleetTopics,
  countElements,
  createLogger,
  decodeVehicleStatus,
  encodeModelRelease,
  encodeRoundTask,
  encodeUpdateAck,
  isFleetError,
  type Logger,
  type VehicleStatus,
} from '../protocol/index.ts';
import { MODEL_NAME, TENSOR_SPECS } from '../models/architecture.ts';
import type { AggregatorEvents } from './events.ts';
import {
  buildAck,
  buildRelease,
  buildRoundTask,
  truncateText,
} from './messages.ts';
import { ModelStore, type StoredModel } from './model-store.ts';
import {
  resolveOptions,
  type AggregatorOptions,
  type ResolvedOptions,
} from './options.ts';
import { OpenRound, type FleetContext, type RoundStats } from './round.ts';
import { selectVehicles } from './selection.ts';
import { saveState } from './state.ts';
import { validateUpdate, type UpdateDecision } from './validate.ts';
import { buildNextVersion, loadCurrentModel } from './versions.ts';
import { VehicleRegistry } from './vehicles.ts';

type Phase = 'new' | 'starting' | 'running' | 'stopping' | 'stopped';

/**
 * The fleet server: runs federated rounds over MQTT. It publishes the
 * current model as a retained release, opens rounds for selected online
 * vehicles, validates and averages their updates (FedAvg weighted by
 * numExamples), and publishes each new version once its ONNX export has
 * matched TF.js. Round number and model version persist in `stateDir`.
 *
 * Events: 'round-opened', 'round-closed', 'round-failed',
 * 'update-decided', 'release-published' (see events.ts).
 */
export class Aggregator extends EventEmitter<AggregatorEvents> {
  /** Options with defaults filled in. */
  readonly options: ResolvedOptions;
  readonly #log: Logger;
  readonly #topics: FleetTopics;
  readonly #store: ModelStore;
  readonly #vehicles = new VehicleRegistry();
  readonly #fleetContext: Omit<FleetContext, 'lastRound'>;
  readonly #tensorSizes: Map<string, number>;
  #phase: Phase = 'new';
  #client: MqttClient | undefined;
  #model: StoredModel | undefined;
  #lastRound = 0;
  #openRound: OpenRound | undefined;
  #roundsCompleted = 0;
  #loop: Promise<void> | undefined;
  #wake: (() => void) | undefined;
  readonly #roundListeners = new Set<() => void>();

  /**
   * Checks and stores the options; nothing connects until `start()`.
   *
   * @throws {TypeError} for a missing id or path.
   * @throws {FleetError} INVALID_CONFIG naming an option that cannot work.
   */
  constructor(options: AggregatorOptions) {
    super();
    this.options = resolveOptions(options);
    const root = options.log ?? createLogger();
    this.#log = root.child({ component: 'aggregator', fleetId: options.fleetId });
    this.#topics = new FleetTopics(this.options.fleetId);
    this.#store = new ModelStore(this.options.stateDir, MODEL_NAME);

    const shapes = new Map<string, number[]>();
    for (const spec of TENSOR_SPECS) {
      if (this.options.trainableTensors.includes(spec.name)) {
        shapes.set(spec.name, spec.shape);
      }
    }
    this.#tensorSizes = new Map(
      [...shapes].map(([name, shape]) => [name, countElements(shape)]),
    );
    this.#fleetContext = {
      modelName: MODEL_NAME,
      trainableShapes: shapes,
      maxMessageBytes: this.options.maxMessageBytes,
    };
  }

  /** The open round, or the last one opened (0 before the first). */
  get currentRound(): number {
    return this.#lastRound;
  }

  /** Version of the current global model. */
  get currentModelVersion(): number {
    return this.#model?.manifest.version ?? 0;
  }

  /** Rounds closed or failed since `start()`. */
  get roundsCompleted(): number {
    return this.#roundsCompleted;
  }

  /** Ids of the vehicles whose last status is online. */
  get onlineVehicles(): string[] {
    return this.#vehicles.onlineIds();
  }

  /**
   * Loads or creates the current model, connects to the broker, publishes
   * the retained release and starts the round loop in the background.
   *
   * @throws {FleetError} from loading the model (see loadCurrentModel).
   * @throws {Error} when called twice, or when `stop()` ran meanwhile.
   */
  async start(): Promise<void> {
    if (this.#phase !== 'new') {
      throw new Error(`aggregator cannot start: it is ${this.#phase}`);
    }
    this.#phase = 'starting';
    const { state, model } = await loadCurrentModel(
      this.options,
      this.#store,
      this.#log,
    );
    this.#model = model;
    this.#lastRound = state.round;
    if (this.#phase !== 'starting') {
      throw new Error('aggregator stopped while starting');
    }

    await this.#connect();
    await this.#publishRelease(model, encodeModelRelease(
      buildRelease(model.manifest, model.onnx),
      this.options.maxMessageBytes,
    ));
    if (this.#phase !== 'starting') {
      throw new Error('aggregator stopped while starting');
    }
    this.#phase = 'running';
    this.#log.info(
      {
        round: state.round,
        modelVersion: model.manifest.version,
        brokerUrl: this.options.brokerUrl,
        seed: this.options.seed,
        trainableTensors: this.options.trainableTensors,
      },
      'aggregator started',
    );
    this.#loop = this.#runRounds();
  }

  /**
   * Stops the round loop and disconnects. A round still open is abandoned
   * without a new version; its number stays used. Safe to call twice.
   */
  async stop(): Promise<void> {
    if (this.#phase === 'stopped' || this.#phase === 'stopping') {
      await this.#loop;
      return;
    }
    const wasStarted = this.#phase !== 'new';
    this.#phase = 'stopping';
    this.#openRound?.close('stopped');
    this.#wake?.();
    await this.#loop;
    if (this.#client !== undefined) await this.#client.endAsync();
    this.#phase = 'stopped';
    this.#notifyRoundListeners();
    if (wasStarted) {
      this.#log.info(
        { round: this.#lastRound, modelVersion: this.currentModelVersion },
        'aggregator stopped',
      );
    }
  }

  /**
   * Resolves once `count` rounds have closed or failed since `start()`.
   * Rejects when the aggregator stops, or reaches maxRounds, first.
   */
  waitForRounds(count: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.#roundsCompleted >= count) {
          this.#roundListeners.delete(check);
          resolve();
        } else if (this.#phase === 'stopped' || this.#isRoundLimitReached()) {
          this.#roundListeners.delete(check);
          reject(
            new Error(
              `aggregator ended after ${this.#roundsCompleted} rounds, ` +
                `before the ${count} awaited`,
            ),
          );
        }
      };
      this.#roundListeners.add(check);
      check();
    });
  }

  /** Resolves when the round loop ends (maxRounds reached or stopped). */
  async whenFinished(): Promise<void> {
    await this.#loop;
  }

  #notifyRoundListeners(): void {
    for (const listener of [...this.#roundListeners]) listener();
  }

  #isRoundLimitReached(): boolean {
    const { maxRounds } = this.options;
    return maxRounds > 0 && this.#roundsCompleted >= maxRounds;
  }

  get #isRunning(): boolean {
    return this.#phase === 'running';
  }

  async #connect(): Promise<void> {
    const clientId = `aggregator-${this.options.fleetId}`;
    // A persistent session (clean: false) lets the broker queue QoS 1
    // updates while the aggregator reconnects.
    const client = connect(this.options.brokerUrl, {
      protocolVersion: 4,
      clientId,
      clean: false,
      reconnectPeriod: 1000,
    });
    this.#client = client;
    client.on('message', (topic, payload) => this.#onMessage(topic, payload));
    client.on('error', (err) => this.#log.warn({ err }, 'mqtt client error'));
    client.on('offline', () => this.#log.warn('mqtt client offline'));
    client.on('reconnect', () => this.#log.debug('mqtt client reconnecting'));

    await new Promise<void>((resolve, reject) => {
      const onConnect = (): void => {
        this.#wake = undefined;
        resolve();
      };
      client.once('connect', onConnect);
      this.#wake = () => {
        client.off('connect', onConnect);
        reject(new Error('aggregator stopped before connecting'));
      };
    });
    client.on('connect', () => this.#log.info('mqtt client reconnected'));
    await client.subscribeAsync({
      [this.#topics.allStatus()]: { qos: 1 },
      [this.#topics.allUpdates()]: { qos: 1 },
    });
    this.#log.info({ clientId, brokerUrl: this.options.brokerUrl }, 'connected to broker');
  }

  #onMessage(topic: string, payload: Buffer): void {
    try {
      const vehicleId = this.#topics.vehicleIdOf(topic);
      if (vehicleId === undefined) return;
      if (topic === this.#topics.update(vehicleId)) {
        this.#onUpdate(vehicleId, payload);
      } else if (topic === this.#topics.status(vehicleId)) {
        this.#onStatus(vehicleId, payload);
      }
    } catch (err) {
      // Vehicle input must never stop the aggregator.
      this.#log.error({ err, topic }, 'message handler failed');
    }
  }

  #onStatus(vehicleId: string, payload: Buffer): void {
    let status: VehicleStatus | undefined;
    try {
      status = payload.byteLength === 0 ? undefined : decodeVehicleStatus(payload);
    } catch (err) {
      if (!isFleetError(err)) throw err;
      this.#log.warn({ vehicleId, code: err.code }, 'invalid vehicle status');
      return;
    }
    if (status !== undefined && status.vehicleId !== vehicleId) {
      this.#log.warn(
        { vehicleId, payloadVehicleId: truncateText(status.vehicleId, 130) },
        'vehicle status names another vehicle',
      );
      return;
    }

    if (this.#vehicles.update(vehicleId, status)) {
      this.#log.debug(
        { vehicleId, online: this.#vehicles.onlineCount, state: status?.state },
        'vehicle status changed',
      );
      this.#wake?.();
    }
  }

  #onUpdate(vehicleId: string, payload: Buffer): void {
    const fleet = { ...this.#fleetContext, lastRound: this.#lastRound };
    const round = this.#openRound;
    const context = round?.contextFor(fleet) ?? {
      ...fleet,
      openRound: undefined,
      modelVersion: this.currentModelVersion,
      selectedVehicles: new Set<string>(),
      seenUpdateIds: new Set<string>(),
      acceptedVehicles: new Set<string>(),
    };
    const decision = validateUpdate(vehicleId, payload, context);
    if (round?.isOpen) round.record(vehicleId, payload.byteLength, decision);

    this.#logDecision(vehicleId, payload.byteLength, decision);
    this.#sendAck(vehicleId, decision);
    this.emit('update-decided', {
      vehicleId,
      round: decision.update?.round,
      updateId: decision.update?.updateId,
      accepted: decision.accepted,
      reasonCode: decision.accepted ? undefined : decision.code,
      bytes: payload.byteLength,
    });
  }

  #logDecision(vehicleId: string, bytes: number, decision: UpdateDecision): void {
    const fields = {
      vehicleId,
      round: decision.update?.round,
      updateId:
        decision.update === undefined
          ? undefined
          : truncateText(decision.update.updateId, 130),
      bytes,
    };
    if (decision.accepted) {
      const { numExamples } = decision.update;
      this.#log.debug({ ...fields, numExamples }, 'update accepted');
    } else {
      this.#log.warn(
        {
          ...fields,
          currentRound: this.#openRound?.isOpen ? this.#lastRound : undefined,
          code: decision.code,
          reason: truncateText(decision.reason),
        },
        'update rejected',
      );
    }
  }

  #sendAck(vehicleId: string, decision: UpdateDecision): void {
    const current = {
      round: this.#lastRound,
      modelVersion: this.currentModelVersion,
    };
    const bytes = encodeUpdateAck(buildAck(decision, current));
    this.#client!
      .publishAsync(this.#topics.ack(vehicleId), Buffer.from(bytes), { qos: 1 })
      .catch((err: unknown) => {
        this.#log.warn({ err, vehicleId }, 'ack publish failed');
      });
  }

  async #publishRelease(model: StoredModel, bytes: Uint8Array): Promise<void> {
    const { version, round, sha256 } = model.manifest;
    await this.#client!.publishAsync(this.#topics.release(), Buffer.from(bytes), {
      qos: 1,
      retain: true,
    });
    this.#log.info(
      { modelVersion: version, round, bytes: bytes.byteLength, sha256 },
      'model release published',
    );
    this.emit('release-published', {
      modelVersion: version,
      round,
      sha256,
      bytes: bytes.byteLength,
    });
  }

  async #runRounds(): Promise<void> {
    while (this.#isRunning && !this.#isRoundLimitReached()) {
      const online = await this.#waitForVehicles();
      if (online === undefined) break;
      try {
        await this.#runRound(online);
      } catch (err) {
        this.#log.error({ err, round: this.#lastRound }, 'round loop failed');
        await this.#sleepUntilWoken(1000);
      }
    }
    if (this.#isRoundLimitReached()) {
      this.#log.info({ rounds: this.#roundsCompleted }, 'max rounds reached');
    }
    this.#notifyRoundListeners();
  }

  /**
   * Waits until enough vehicles are online: max(minVehiclesOnline,
   * minUpdates), or at least minUpdates once onlineWaitTimeoutMs has
   * passed. Returns the online ids, or undefined when stopping.
   */
  async #waitForVehicles(): Promise<string[] | undefined> {
    const { minVehiclesOnline, minUpdates, onlineWaitTimeoutMs } = this.options;
    const target = Math.max(minVehiclesOnline, minUpdates);
    let waitStartedMs = Date.now();
    let isLogged = false;
    while (this.#isRunning) {
      const online = this.#vehicles.onlineIds();
      if (online.length >= target) return online;

      const waitedMs = Date.now() - waitStartedMs;
      if (waitedMs >= onlineWaitTimeoutMs) {
        if (online.length >= minUpdates) {
          this.#log.warn(
            { online: online.length, minVehiclesOnline, waitedMs },
            'opening round with fewer vehicles than requested',
          );
          return online;
        }
        waitStartedMs = Date.now();
        isLogged = false;
      }
      if (!isLogged) {
        this.#log.info(
          { online: online.length, target, minUpdates },
          'waiting for vehicles',
        );
        isLogged = true;
      }
      await this.#sleepUntilWoken(waitStartedMs + onlineWaitTimeoutMs - Date.now());
    }
    return undefined;
  }

  /** Sleeps up to `ms`; a status change or `stop()` wakes it earlier. */
  #sleepUntilWoken(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const wake = (): void => {
        clearTimeout(timer);
        if (this.#wake === wake) this.#wake = undefined;
        resolve();
      };
      const timer = setTimeout(wake, Math.max(0, ms));
      this.#wake = wake;
    });
  }

  async #runRound(online: string[]): Promise<void> {
    const model = this.#model!;
    const roundNumber = this.#lastRound + 1;
    const selected = selectVehicles(
      online,
      this.options.vehiclesPerRound,
      this.options.seed,
      roundNumber,
    );
    saveState(this.options.stateDir, {
      round: roundNumber,
      modelVersion: model.manifest.version,
    });
    const round = new OpenRound({
      round: roundNumber,
      baseModelVersion: model.manifest.version,
      selected,
      tensorSizes: this.#tensorSizes,
      timeoutMs: this.options.roundTimeoutMs,
    });
    this.#lastRound = roundNumber;
    this.#openRound = round;

    this.#announceRound(round, model);
    const trigger = await round.closed;
    if (trigger === 'stopped') {
      this.#log.info({ round: roundNumber }, 'round abandoned at stop');
      return;
    }
    await this.#finishRound(round, trigger);
  }

  #announceRound(round: OpenRound, model: StoredModel): void {
    const task = buildRoundTask(round, this.options, MODEL_NAME, model.manifest.sha256);
    const fields = {
      round: round.round,
      modelVersion: round.baseModelVersion,
      selected: round.selected.size,
      deadlineMs: round.deadlineMs,
    };
    this.#log.info(fields, 'round opened');
    this.emit('round-opened', {
      round: round.round,
      modelVersion: round.baseModelVersion,
      selected: task.selectedVehicles,
      deadlineMs: round.deadlineMs,
    });
    const bytes = encodeRoundTask(task, this.options.maxMessageBytes);
    this.#client!
      .publishAsync(this.#topics.roundTask(), Buffer.from(bytes), { qos: 1, retain: true })
      .catch((err: unknown) => {
        this.#log.error({ err, round: round.round }, 'round task publish failed');
      });
  }

  async #finishRound(round: OpenRound, trigger: string): Promise<void> {
    const stats = round.stats();
    const current = this.#model!;
    let next: StoredModel;
    let releaseBytes: Uint8Array;
    let maxAbsDiff: number;
    try {
      if (stats.accepted < this.options.minUpdates) {
        throw new FleetError(
          ErrorCode.QuorumNotMet,
          `round ${stats.round} closed (${trigger}) with ${stats.accepted} ` +
            `accepted updates, below the quorum of ${this.options.minUpdates}`,
        );
      }
      const mean = round.accumulator.result();
      ({ model: next, maxAbsDiff } = await buildNextVersion(
        current,
        mean,
        stats,
        this.options,
      ));
      releaseBytes = encodeModelRelease(
        buildRelease(next.manifest, next.onnx),
        this.options.maxMessageBytes,
      );
      this.#store.save(next);
      saveState(this.options.stateDir, {
        round: stats.round,
        modelVersion: next.manifest.version,
      });
    } catch (err) {
      this.#failRound(round.stats(), err);
      return;
    }

    this.#model = next;
    this.#openRound = undefined;
    await this.#publishRelease(next, releaseBytes).catch((err: unknown) => {
      this.#log.error({ err, modelVersion: next.manifest.version }, 'release publish failed');
    });
    // Stats again, so that durationMs includes export and publishing.
    this.#completeRound(
      round.stats(),
      trigger,
      next,
      releaseBytes.byteLength,
      maxAbsDiff,
    );
  }

  #completeRound(
    stats: RoundStats,
    trigger: string,
    next: StoredModel,
    releaseBytes: number,
    exportMaxAbsDiff: number,
  ): void {
    const event = {
      ...stats,
      modelVersion: next.manifest.version,
      accuracy: next.manifest.testAccuracy ?? undefined,
      releaseBytes,
      exportMaxAbsDiff,
    };
    this.#log.info(
      {
        round: stats.round,
        modelVersion: event.modelVersion,
        trigger,
        accepted: stats.accepted,
        rejected: stats.rejected,
        numExamples: stats.numExamples,
        accuracy: event.accuracy,
        durationMs: stats.durationMs,
      },
      'round closed',
    );
    this.#roundsCompleted += 1;
    this.emit('round-closed', event);
    this.#notifyRoundListeners();
  }

  #failRound(stats: RoundStats, err: unknown): void {
    this.#openRound = undefined;
    const reasonCode = isFleetError(err) ? err.code : 'INTERNAL_ERROR';
    const message = err instanceof Error ? err.message : String(err);
    const fields = {
      round: stats.round,
      modelVersion: this.currentModelVersion,
      code: reasonCode,
      accepted: stats.accepted,
      rejected: stats.rejected,
    };
    if (reasonCode === ErrorCode.QuorumNotMet) {
      this.#log.warn(fields, 'round failed');
    } else {
      this.#log.error({ ...fields, err }, 'round failed');
    }
    this.#roundsCompleted += 1;
    this.emit('round-failed', {
      ...stats,
      modelVersion: this.currentModelVersion,
      reasonCode,
      message,
    });
    this.#notifyRoundListeners();
  }
}
