import { EventEmitter } from 'node:events';
import path from 'node:path';
import type { IPublishPacket, MqttClient } from 'mqtt';
import {
  ErrorCode,
  FleetTopics,
  createLogger,
  decodeUpdatePayload,
  encodeUpdateAck,
  type Logger,
  type ModelUpdate,
} from '../protocol/index.ts';
import { endClient, settleWithin } from '../protocol/mqtt-end.ts';
import { MODEL_NAME, TENSOR_SPECS } from '../models/architecture.ts';
import { connectToBroker } from './connection.ts';
import { DepotPartials } from './depot-partials.ts';
import type { AggregatorEvents, StagedReleaseEvents } from './events.ts';
import { receiveUpdate, type IngressState } from './ingress.ts';
import { buildAck } from './messages.ts';
import type { SecureRoundSession } from './secure-round.ts';
import { ModelStore, type StoredModel } from './model-store.ts';
import {
  resolveOptions,
  type AggregatorOptions,
  type ResolvedOptions,
} from './options.ts';
import {
  SIGNED_NOTICE_OVERHEAD_BYTES,
  checkReleaseFits,
} from './release-messages.ts';
import { ReleasePublisher } from './release-publisher.ts';
import { ReleaseSigner } from './release-signer.ts';
import type { FleetContext } from './round.ts';
import type { RoundHost } from './round-runner.ts';
import { RoundLoop } from './round-loop.ts';
import {
  rollbackSteps,
  selectStartModel,
  type RollbackHost,
} from './rollback.ts';
import { StagedRelease } from './staged-release.ts';
import { loadCurrentModel } from './versions.ts';
import { VehicleRegistry } from './vehicles.ts';
import { aggregationKernelName } from './kernel/index.ts';
import {
  startLiveView,
  type LiveView,
  type LiveViewSource,
} from './live-view/index.ts';

/** Time `stop()` waits for a graceful MQTT disconnect. */
const DISCONNECT_TIMEOUT_MS = 2000;
/** Time `stop()` waits for the round loop to end. */
const LOOP_STOP_TIMEOUT_MS = 2000;

/**
 * Accepted update ids remembered across rounds, so that a late copy is
 * acked DUPLICATE_UPDATE. About 100 bytes each (an estimate).
 */
const MAX_REMEMBERED_UPDATES = 10_000;

/**
 * Asynchronous mode: updates held while one buffer is merged, about
 * 0.55 MB each for the dense layers. Beyond it, updates are judged at
 * once and rejected as late.
 */
const MAX_HELD_UPDATES = 256;

type Phase = 'new' | 'starting' | 'running' | 'stopping' | 'stopped';

/**
 * The fleet server: runs federated rounds over MQTT. It publishes the
 * current model as a retained release, opens rounds for selected online
 * vehicles, validates and averages their updates (FedAvg weighted by
 * numExamples), and publishes each new version once its ONNX export has
 * matched TF.js. Round number and model version persist in `stateDir`.
 *
 * A release travels as retained chunks plus a retained notice (see
 * release-publisher.ts). `rollbackTo` makes an older stored version the
 * current one again.
 *
 * With the option depots it also counts depot aggregators' partial
 * aggregates (see depot-partials.ts).
 *
 * Events: 'round-opened', 'round-closed', 'round-failed',
 * 'update-decided', 'release-published', and with the option
 * stagedReleases 'version-held' (see events.ts).
 */
export class Aggregator extends EventEmitter<
  AggregatorEvents & StagedReleaseEvents
> {
  /** Options with defaults filled in. */
  readonly options: ResolvedOptions;
  readonly #log: Logger;
  readonly #topics: FleetTopics;
  readonly #store: ModelStore;
  readonly #publisher: ReleasePublisher;
  readonly #vehicles = new VehicleRegistry();
  readonly #fleetContext: Omit<FleetContext, 'lastRound' | 'earlierAccepted'>;
  readonly #stopping = new AbortController();
  readonly #roundListeners = new Set<() => void>();
  /** The last round task published, for a broker that lost it. */
  #lastRoundTask: { bytes: Uint8Array; round: number } | undefined;
  /** Recently accepted update ids and their round, oldest first. */
  readonly #acceptedUpdates = new Map<string, number>();
  #phase: Phase = 'new';
  #client: MqttClient | undefined;
  /**
   * Acks decided before `#client` is set. A persistent session delivers
   * queued updates while the connection is still being set up.
   */
  #pendingAcks: Array<{ topic: string; ack: Uint8Array }> = [];
  readonly #rounds: RoundLoop;
  #loop: Promise<void> | undefined;
  /** Asynchronous mode: updates that arrived between two buffers. */
  #heldUpdates: Array<{ vehicleId: string; payload: Buffer }> = [];
  /** The secure round taking messages, if one is running. */
  #secureSession: SecureRoundSession | undefined;
  /** Web page, JSON API and metrics, when the option liveViewPort is set. */
  #liveView: LiveView | undefined;
  /** Follows the fleet-wide release; set with the option stagedReleases. */
  readonly #staged: StagedRelease | undefined;
  /** Takes depots' partials; set with the option depots. */
  readonly #depotPartials: DepotPartials | undefined;

  /**
   * Checks and stores the options. Nothing connects until `start()`.
   *
   * @throws {TypeError} for a missing id or path.
   * @throws {FleetError} INVALID_CONFIG naming an option that cannot work.
   */
  constructor(options: AggregatorOptions) {
    super();
    this.options = resolveOptions(options);
    const root = options.log ?? createLogger();
    this.#log = root.child({
      component: 'aggregator',
      fleetId: this.options.fleetId,
    });
    this.#topics = new FleetTopics(this.options.fleetId);
    this.#store = new ModelStore(this.options.stateDir, MODEL_NAME);
    this.#rounds = new RoundLoop({
      maxRounds: this.options.maxRounds,
      stopping: this.#stopping.signal,
      hostFor: (signal, maxRounds) => this.#roundHost(signal, maxRounds),
    });
    const signingKey = this.options.releaseSigningKey;
    this.#staged = this.options.stagedReleases
      ? new StagedRelease({
          topics: this.#topics,
          stateDir: this.options.stateDir,
          store: this.#store,
          log: this.#log,
          signingKey,
        })
      : undefined;
    this.#publisher = new ReleasePublisher({
      stateDir: this.options.stateDir,
      topics: this.#topics,
      maxMessageBytes: this.options.maxMessageBytes,
      log: this.#log,
      signer:
        signingKey === undefined
          ? undefined
          : new ReleaseSigner(signingKey, this.options.stateDir, this.#log),
    });
    this.#depotPartials =
      this.options.depots.length === 0
        ? undefined
        : new DepotPartials({
            depots: this.options.depots,
            topics: this.#topics,
            log: this.#log,
            publishAck: (topic, ack) => this.#publishAckTo(topic, ack),
            ingressState: () => this.#ingressState(),
            rememberAccepted: (id, round) => this.#rememberAccepted(id, round),
          });
    const trainable = TENSOR_SPECS.filter((spec) =>
      this.options.trainableTensors.includes(spec.name),
    );
    this.#fleetContext = {
      modelName: MODEL_NAME,
      trainableShapes: new Map(trainable.map((s) => [s.name, s.shape])),
      maxMessageBytes: this.options.maxMessageBytes,
      maxExamplesPerUpdate: this.options.maxExamplesPerUpdate,
      maxAbsDeltaValue: this.options.maxAbsDeltaValue,
      vehicleKeys: this.options.vehicleKeys,
    };
    if (this.options.asyncBuffer !== undefined) {
      this.on('round-opened', () => this.#judgeHeldUpdates());
      // After the last round, held updates are judged (and rejected as
      // late), so that their vehicles stop resending them.
      const judgeAfterLastRound = (): void => {
        if (this.#rounds.runner?.isRoundLimitReached === true) {
          this.#judgeHeldUpdates();
        }
      };
      this.on('round-closed', judgeAfterLastRound);
      this.on('round-failed', judgeAfterLastRound);
    }
  }

  /** The open round, or the last one opened (0 before the first). */
  get currentRound(): number {
    return this.#rounds.runner?.lastRound ?? 0;
  }

  /** Version of the current global model (0 before `start()`). */
  get currentModelVersion(): number {
    return this.#rounds.runner?.model.manifest.version ?? 0;
  }

  /** Rounds closed or failed since `start()`. */
  get roundsCompleted(): number {
    return this.#rounds.roundsCompleted;
  }

  /** Ids of the vehicles whose last status is online. */
  get onlineVehicles(): string[] {
    return this.#vehicles.onlineIds();
  }

  /** URL of the live view once started; undefined when it is off. */
  get liveViewUrl(): string | undefined {
    return this.#liveView?.url;
  }

  /**
   * Loads or creates the current model, rolls back when the option
   * `rollbackToVersion` is set, checks that the model's release fits
   * in maxMessageBytes, connects to the broker, publishes the retained
   * release and starts the round loop in the background.
   *
   * @throws {FleetError} from loading the model (see loadCurrentModel),
   *   INVALID_CONFIG when the release notice cannot fit in
   *   maxMessageBytes, and the errors of `loadRollbackTarget`.
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
    const served = selectStartModel(
      this.#store,
      this.options.stateDir,
      { state, model },
      this.options.rollbackToVersion,
      this.#log,
    );
    checkReleaseFits(
      served.manifest,
      served.onnx,
      this.options.maxMessageBytes,
      this.options.releaseSigningKey === undefined
        ? 0
        : SIGNED_NOTICE_OVERHEAD_BYTES,
    );
    this.#rounds.begin(served, state.round);
    if (this.options.liveViewPort !== undefined) {
      this.#liveView = await startLiveView({
        port: this.options.liveViewPort,
        source: this.#liveViewSource(),
        log: this.#log,
      });
    }

    await this.#connect();
    // With staged releases the fleet-wide notice, when there is one,
    // decides the version; the first round adopts it.
    const staged = this.#staged;
    const version = served.manifest.version;
    if (
      staged === undefined ||
      (await staged.shouldPublishAtStart(version, this.#stopping.signal))
    ) {
      await this.#publishRelease(served);
    }
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
        releaseKeyId: this.options.releaseSigningKey?.keyId,
        vehicleKeys: this.options.vehicleKeys?.size,
        depots: this.options.depots,
        aggregationKernel: aggregationKernelName(),
      },
      'aggregator started',
    );
    this.#loop = this.#rounds.run();
  }

  /**
   * Makes the stored model `version` the current one again. The open
   * round is abandoned (a 'round-failed' event with ROLLED_BACK), the
   * state is saved, and the version's chunks and retained notice are
   * published again, so that vehicles and late joiners switch to it.
   * Later rounds train from it, and the versions they produce take
   * numbers above the highest one ever stored, with it as their parent.
   * A round already closing when this is called finishes first, and its
   * version is rolled back too.
   *
   * @throws {RangeError} when `version` is not an integer >= 0.
   * @throws {FleetError} INVALID_MODEL when `version` is not stored,
   *   INVALID_CONFIG when it is not older than the current version.
   * @throws {Error} when the aggregator is not running (use the option
   *   `rollbackToVersion` before `start()`).
   */
  async rollbackTo(version: number): Promise<void> {
    if (this.#phase !== 'running') {
      throw new Error(
        `aggregator cannot roll back while ${this.#phase}; pass the ` +
          'option rollbackToVersion to roll back at start',
      );
    }
    await this.#rounds.switchRunner(
      rollbackSteps(this.#rollbackHost(), version),
    );
  }

  #rollbackHost(): RollbackHost {
    return {
      store: this.#store,
      stateDir: this.options.stateDir,
      log: this.#log,
      reportFailedRound: (event) => {
        this.emit('round-failed', event);
        this.#notifyRoundListeners();
      },
      publishRoundTask: (bytes, round) => this.#publishRoundTask(bytes, round),
      publishRelease: (model) => this.#publishRelease(model),
    };
  }

  /**
   * Stops the round loop and disconnects. A round still open is abandoned
   * without a new version, and its number is not reused. Safe to call
   * twice.
   */
  async stop(): Promise<void> {
    if (this.#phase === 'stopped' || this.#phase === 'stopping') {
      await this.#loop;
      return;
    }
    const wasStarted = this.#phase !== 'new';
    this.#phase = 'stopping';
    if (this.#heldUpdates.length > 0) {
      // Not acked, so the vehicles keep them in their outbox and resend.
      this.#log.info(
        { count: this.#heldUpdates.length },
        'held updates left unjudged at stop',
      );
      this.#heldUpdates = [];
    }
    // First, so that a restarted aggregator can bind the same port.
    await this.#liveView?.close();
    this.#rounds.runner?.abandonOpenRound();
    this.#stopping.abort();
    // Bounded, because the loop may wait on a QoS 1 publish that completes
    // only over a live connection.
    const loopEnded = await settleWithin(
      this.#loop ?? Promise.resolve(),
      LOOP_STOP_TIMEOUT_MS,
    );
    if (!loopEnded) {
      this.#log.warn(
        { round: this.currentRound, timeoutMs: LOOP_STOP_TIMEOUT_MS },
        'round loop still waiting at stop, disconnecting anyway',
      );
    }
    if (this.#client !== undefined) {
      await endClient(this.#client, DISCONNECT_TIMEOUT_MS);
    }

    this.#phase = 'stopped';
    this.#notifyRoundListeners();
    if (wasStarted) {
      this.#log.info(
        { round: this.currentRound, modelVersion: this.currentModelVersion },
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
        const completed = this.roundsCompleted;
        const hasEnded =
          this.#phase === 'stopped' ||
          this.#rounds.isRoundLimitReached ||
          this.isPrivacyBudgetSpent;
        if (completed >= count) {
          this.#roundListeners.delete(check);
          resolve();
        } else if (hasEnded) {
          this.#roundListeners.delete(check);
          const text = `aggregator ended after ${completed} rounds, before ${count}`;
          reject(new Error(text));
        }
      };
      this.#roundListeners.add(check);
      check();
    });
  }

  /** True once rounds stopped because the DP privacy budget is spent. */
  get isPrivacyBudgetSpent(): boolean {
    return this.#rounds.runner?.isBudgetSpent === true;
  }

  /**
   * Resolves when the round loop ends (maxRounds reached, privacy budget
   * spent, or stopped).
   */
  async whenFinished(): Promise<void> {
    await this.#loop;
  }

  /** The events and accessors the live view reads. */
  #liveViewSource(): LiveViewSource {
    return {
      // The live view listens to AggregatorEvents only; eventNames() is
      // the one method whose type differs.
      events: this as EventEmitter<AggregatorEvents>,
      fleetId: this.options.fleetId,
      quorum: this.options.minUpdates,
      maxRounds: this.options.maxRounds,
      currentRound: () => this.currentRound,
      currentModelVersion: () => this.currentModelVersion,
      onlineVehicles: () => this.#vehicles.onlineStatuses(),
      // The default state file of `npm run rollout`.
      rolloutStatePath: path.join(
        this.options.stateDir,
        'rollout',
        'rollout.json',
      ),
    };
  }

  #notifyRoundListeners(): void {
    for (const listener of [...this.#roundListeners]) listener();
  }

  /** Host of one round runner, with its own signal and round budget. */
  #roundHost(signal: AbortSignal, maxRounds: number): RoundHost {
    const staged = this.#staged;
    return {
      options: { ...this.options, maxRounds },
      log: this.#log,
      store: this.#store,
      vehicles: this.#vehicles,
      signal,
      publishRoundTask: (bytes, round) => this.#publishRoundTask(bytes, round),
      publishRelease: (model) =>
        staged === undefined
          ? this.#publishRelease(model)
          : this.#holdRelease(staged, model),
      awaitFleetRelease:
        staged === undefined
          ? undefined
          : (model) =>
              staged.gate(model, signal, {
                rollback: this.#rollbackHost(),
                switchRunner: (steps) => this.#rounds.switchRunner(steps),
              }),
      publishSecure: (vehicleId, bytes) =>
        this.#publishSecure(vehicleId, bytes),
      setSecureSession: (session) => {
        this.#secureSession = session;
      },
      emit: this.emit.bind(this),
      onRoundEnded: () => this.#notifyRoundListeners(),
    };
  }

  async #connect(): Promise<void> {
    this.#client = await connectToBroker({
      brokerUrl: this.options.brokerUrl,
      clientId: `aggregator-${this.options.fleetId}`,
      subscriptions: [
        this.#topics.allStatus(),
        this.#topics.allUpdates(),
        ...(this.options.secureAggregation === undefined
          ? []
          : [this.#topics.allSecureFromVehicles()]),
        ...(this.#staged?.subscriptions ?? []),
        ...(this.#depotPartials?.subscriptions ?? []),
      ],
      // mqtt.js passes the packet too. Its retain flag separates a replayed
      // release notice from a new one.
      onMessage: (topic: string, payload: Buffer, packet?: IPublishPacket) =>
        this.#onMessage(topic, payload, packet?.retain === true),
      signal: this.#stopping.signal,
      log: this.#log,
      security: this.options.security,
    });
    const pending = this.#pendingAcks;
    this.#pendingAcks = [];
    for (const { topic, ack } of pending) this.#publishAckTo(topic, ack);
    this.#client.on('connect', (connack) => {
      if (!connack.sessionPresent) this.#republishRetained();
    });
  }

  /**
   * Publishes the current release and the open round's task again. A
   * broker that lost the session, for example after a restart without
   * persistence, has lost the retained messages too.
   */
  #republishRetained(): void {
    const runner = this.#rounds.runner;
    if (runner === undefined || this.#phase !== 'running') return;
    const model = runner.model;
    this.#log.warn(
      { modelVersion: model.manifest.version, round: runner.lastRound },
      'broker session lost, publishing release and round task again',
    );
    // With staged releases the rollout controller owns the fleet-wide
    // release, which may be newer than what this aggregator published.
    if (this.#staged !== undefined) {
      this.#log.info(
        { modelVersion: model.manifest.version },
        'staged releases: fleet-wide release left to the rollout controller',
      );
    } else {
      this.#publishRelease(model).catch((err: unknown) => {
        const modelVersion = model.manifest.version;
        this.#log.error({ err, modelVersion }, 'release publish failed');
      });
    }
    const task = this.#lastRoundTask;
    if (task !== undefined && runner.openRound?.isOpen === true) {
      this.#publishRoundTask(task.bytes, task.round);
    }
  }

  #onMessage(topic: string, payload: Buffer, isRetained = false): void {
    try {
      if (this.#staged?.receive(topic, payload, isRetained) === true) return;
      if (this.#depotPartials?.receive(topic, payload) === true) return;
      const vehicleId = this.#topics.vehicleIdOf(topic);
      if (vehicleId === undefined) return;
      if (topic === this.#topics.update(vehicleId)) {
        this.#onUpdate(vehicleId, payload);
      } else if (topic === this.#topics.status(vehicleId)) {
        this.#vehicles.applyStatusMessage(vehicleId, payload, this.#log);
      } else if (topic === this.#topics.secureFromVehicle(vehicleId)) {
        this.#onSecureMessage(vehicleId, payload);
      }
    } catch (err) {
      // Vehicle input must never stop the aggregator.
      this.#log.error({ err, topic }, 'message handler failed');
    }
  }

  #onSecureMessage(vehicleId: string, payload: Buffer): void {
    const session = this.#secureSession;
    if (session === undefined) {
      this.#log.info(
        { vehicleId, bytes: payload.length },
        'secure message outside a secure round dropped',
      );
      return;
    }
    session.receive(vehicleId, payload);
  }

  /**
   * Rejects a plain update while rounds are secure: counting it would show
   * the aggregator one vehicle's update, which secure aggregation is
   * there to prevent. The ack lets the vehicle drop it from its outbox.
   */
  #rejectPlainUpdate(vehicleId: string, payload: Buffer): void {
    const runner = this.#rounds.runner;
    let update: ModelUpdate | undefined;
    try {
      update = decodeUpdatePayload(payload);
    } catch {
      update = undefined;
    }
    const reason =
      `vehicle ${vehicleId} sent a plain update, but rounds use secure ` +
      'aggregation; only masked inputs are accepted';
    this.#log.warn(
      { vehicleId, updateId: update?.updateId?.slice(0, 130) },
      'plain update rejected in secure mode',
    );
    const ack = buildAck(
      {
        accepted: false,
        code: ErrorCode.SecureAggregationRequired,
        reason,
        update,
      },
      {
        round: runner?.lastRound ?? 0,
        modelVersion: runner?.model.manifest.version ?? 0,
      },
    );
    this.#publishAck(vehicleId, encodeUpdateAck(ack));
    this.emit('update-decided', {
      vehicleId,
      round: update?.round,
      updateId: update?.updateId,
      accepted: false,
      reasonCode: ErrorCode.SecureAggregationRequired,
      bytes: payload.length,
    });
  }

  #publishSecure(vehicleId: string, bytes: Uint8Array): void {
    const client = this.#client;
    const topic = this.#topics.secureToVehicle(vehicleId);
    if (client === undefined) {
      this.#log.warn(
        { vehicleId, topic },
        'secure message not sent, no client',
      );
      return;
    }
    client
      .publishAsync(topic, Buffer.from(bytes), { qos: 1 })
      .catch((err: unknown) => {
        this.#log.warn(
          { err, vehicleId, topic },
          'secure message publish failed',
        );
      });
  }

  /**
   * Asynchronous mode: keeps an update that arrives while one buffer is
   * being merged and the next is not open yet, so that it counts in the
   * next buffer instead of being rejected as late. Returns whether it was
   * held; at most MAX_HELD_UPDATES wait.
   */
  #holdBetweenBuffers(vehicleId: string, payload: Buffer): boolean {
    const runner = this.#rounds.runner;
    if (
      this.options.asyncBuffer === undefined ||
      runner === undefined ||
      runner.openRound?.isOpen === true ||
      runner.isRoundLimitReached ||
      this.#phase !== 'running' ||
      this.#heldUpdates.length >= MAX_HELD_UPDATES
    ) {
      return false;
    }
    this.#heldUpdates.push({ vehicleId, payload });
    this.#log.debug(
      { vehicleId, held: this.#heldUpdates.length },
      'update held for the next buffer',
    );
    return true;
  }

  /** Judges the updates held between buffers, once a buffer is open. */
  #judgeHeldUpdates(): void {
    const held = this.#heldUpdates;
    this.#heldUpdates = [];
    if (held.length > 0) {
      this.#log.info({ count: held.length }, 'judging held updates');
    }
    for (const { vehicleId, payload } of held) {
      this.#onUpdate(vehicleId, payload);
    }
  }

  #onUpdate(vehicleId: string, payload: Buffer): void {
    if (this.options.secureAggregation !== undefined) {
      this.#rejectPlainUpdate(vehicleId, payload);
      return;
    }
    if (this.#holdBetweenBuffers(vehicleId, payload)) return;
    const state = this.#ingressState();
    if (state === undefined) return;
    const { ack, event, decision } = receiveUpdate(
      vehicleId,
      payload,
      state,
      this.#log,
    );
    if (decision.accepted) {
      this.#rememberAccepted(decision.update.updateId, decision.update.round);
    }

    this.#publishAck(vehicleId, ack);
    this.emit('update-decided', event);
  }

  /** The round state an update or partial arriving now is judged against. */
  #ingressState(): IngressState | undefined {
    const runner = this.#rounds.runner;
    if (runner === undefined) return undefined;
    return {
      fleet: {
        ...this.#fleetContext,
        lastRound: runner.lastRound,
        earlierAccepted: this.#acceptedUpdates,
      },
      round: runner.openRound,
      currentModelVersion: runner.model.manifest.version,
    };
  }

  #rememberAccepted(updateId: string, round: number): void {
    this.#acceptedUpdates.set(updateId, round);
    if (this.#acceptedUpdates.size > MAX_REMEMBERED_UPDATES) {
      const oldest = this.#acceptedUpdates.keys().next().value as string;
      this.#acceptedUpdates.delete(oldest);
    }
  }

  #publishAck(vehicleId: string, ack: Uint8Array): void {
    this.#publishAckTo(this.#topics.ack(vehicleId), ack);
  }

  /** Publishes an ack with QoS 1, or queues it until the client is set. */
  #publishAckTo(topic: string, ack: Uint8Array): void {
    const client = this.#client;
    if (client === undefined) {
      this.#pendingAcks.push({ topic, ack });
      return;
    }
    client
      .publishAsync(topic, Buffer.from(ack), { qos: 1 })
      .catch((err: unknown) => {
        this.#log.warn({ err, topic }, 'ack publish failed');
      });
  }

  #publishRoundTask(bytes: Uint8Array, round: number): void {
    this.#lastRoundTask = { bytes, round };
    const topic = this.#topics.roundTask();
    const options = { qos: 1, retain: true } as const;
    this.#client!.publishAsync(topic, Buffer.from(bytes), options).catch(
      (err: unknown) => {
        this.#log.error({ err, round, topic }, 'round task publish failed');
      },
    );
  }

  /** Stores nothing more: the version is held, not published. */
  async #holdRelease(staged: StagedRelease, model: StoredModel): Promise<void> {
    const { version: modelVersion, round } = model.manifest;
    staged.hold(modelVersion);
    this.emit('version-held', {
      modelVersion,
      round,
      fleetVersion: staged.fleetVersion,
    });
  }

  /** Publishes the chunks and retained notice of `model`. */
  async #publishRelease(model: StoredModel): Promise<void> {
    const { version, round, sha256 } = model.manifest;
    const client = this.#client!;
    const options = { qos: 1, retain: true } as const;
    const published = await this.#publisher.publish(
      model,
      async (topic, bytes) => {
        const payload = Buffer.from(
          bytes.buffer,
          bytes.byteOffset,
          bytes.byteLength,
        );
        await client.publishAsync(topic, payload, options);
      },
    );
    if (published.signedNotice !== undefined) {
      // Kept beside the version, so that the registry can show and export
      // the signature of what the fleet received.
      try {
        this.#store.saveSignedRelease(version, published.signedNotice);
      } catch (err) {
        this.#log.warn(
          { err, modelVersion: version },
          'signed notice not saved',
        );
      }
    }

    this.#log.info(
      {
        modelVersion: version,
        round,
        sha256,
        bytes: published.noticeBytes,
        chunkCount: published.chunkCount,
        chunkBytes: published.chunkBytes,
        releaseSequence: published.releaseSequence,
        keyId: published.keyId,
      },
      'model release published',
    );
    this.emit('release-published', {
      modelVersion: version,
      round,
      sha256,
      bytes: published.noticeBytes,
    });
  }
}
