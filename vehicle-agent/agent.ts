/**
 * The vehicle daemon: deploys model releases, trains on round tasks and
 * publishes updates over MQTT.
 */
import { EventEmitter } from 'node:events';
import path from 'node:path';
import type { ISubscriptionMap, MqttClient } from 'mqtt';
import {
  selectTrainingBackend,
  type TrainingBackend,
} from '../models/backend.ts';
import { loadLabelledImages, type LabelledImages } from '../models/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetTopics,
  VehicleState,
  createLogger,
  decodeRoundTask,
  decodeUpdateAck,
  encodeVehicleStatus,
  isFleetError,
  type Logger,
  type ModelRelease,
  type RoundTask,
  type UpdateAck,
} from '../protocol/index.ts';
import { recordAck } from './acks.ts';
import { createBrokerClient } from './connection.ts';
import { endClient, settleWithin } from '../protocol/mqtt-end.ts';
import { ModelDeployment } from './deployment.ts';
import {
  createCounters,
  type AgentCounters,
  type AgentEvents,
} from './events.ts';
import { FeatureCache } from './feature-cache.ts';
import { SecureParticipant } from './secure-participant.ts';
import { FinishedRounds } from './finished-rounds.ts';
import {
  resolveAgentOptions,
  type ResolvedAgentOptions,
  type VehicleAgentOptions,
} from './options.ts';
import { ReleaseHandler } from './release-handler.ts';
import { ReleaseVerifier, claimedVersionOf } from './release-verifier.ts';
import {
  ReleaseDownloader,
  createDownloadCounters,
  mqttChunkTransport,
  type DownloadCounters,
} from './release-download.ts';
import { Outbox } from './outbox.ts';
import { RoundRunner } from './round-runner.ts';
import { CandidateTracker } from './candidate.ts';
import { InferenceReporter, holdOutFrames } from './evaluation.ts';
import { SHADOW_DIR, ShadowModel } from './shadow.ts';

/** Time `stop()` waits for the OFFLINE status to be acknowledged. */
const OFFLINE_PUBLISH_TIMEOUT_MS = 2000;
/**
 * Time a status publish is awaited. A PUBACK that never comes (the client
 * ended, or the connection dropped) must not hold up what awaits the
 * status, such as a deployment and with it `stop()`; the session still
 * delivers the status on the next connection.
 */
const STATUS_PUBLISH_TIMEOUT_MS = 5000;
/** Time `stop()` waits for a deployment in progress. */
const RELEASES_STOP_TIMEOUT_MS = 10_000;
/** File in the state directory listing rounds with a stored update. */
const FINISHED_ROUNDS_FILE = 'finished-rounds.json';
/** File in the state directory holding the top-k error feedback residual. */
const ERROR_FEEDBACK_FILE = 'error-feedback.pb';
/** Time `stop()` waits for a graceful MQTT disconnect. */
const DISCONNECT_TIMEOUT_MS = 2000;
/** Time `stop()` waits for an aborted training run to end. */
const RUN_STOP_TIMEOUT_MS = 3000;

/**
 * Vehicle daemon. The constructor only checks options. `start()` loads the
 * frames, picks the training backend, restores the deployed model and
 * creates the MQTT client, which connects in the background. Malformed or
 * rejected input is logged at warn and skipped, so the daemon keeps
 * running.
 */
export class VehicleAgent extends EventEmitter<AgentEvents> {
  readonly vehicleId: string;
  readonly fleetId: string;
  private readonly options: ResolvedAgentOptions;
  private readonly log: Logger;
  private readonly topics: FleetTopics;
  private readonly deployment: ModelDeployment;
  private readonly featureCache = new FeatureCache();
  private readonly stats = createCounters();
  private readonly downloadCounters = createDownloadCounters();
  private frames: LabelledImages | undefined;
  private trainingBackend: TrainingBackend | undefined;
  private client: MqttClient | undefined;
  /** Id of the current MQTT connection, carried in every status. */
  private connectionId = Date.now();
  private rounds: RoundRunner | undefined;
  private state: 'idle' | 'starting' | 'running' | 'stopped' = 'idle';
  private starting: Promise<void> | undefined;
  private readonly releases: ReleaseHandler;
  private readonly releaseVerifier: ReleaseVerifier;
  private readonly outbox: Outbox;
  private readonly secure: SecureParticipant;
  private readonly candidates: CandidateTracker;
  private readonly shadow: ShadowModel;
  private reporter: InferenceReporter | undefined;

  /**
   * @throws {TypeError} for a missing or wrongly typed option.
   * @throws {RangeError} for an id that is not one MQTT topic level or a
   *   number out of range.
   */
  constructor(options: VehicleAgentOptions) {
    super();
    this.options = resolveAgentOptions(options);
    this.vehicleId = this.options.vehicleId;
    this.fleetId = this.options.fleetId;
    this.topics = new FleetTopics(this.fleetId);
    this.log = (options.log ?? createLogger()).child({
      component: 'agent',
      vehicleId: this.vehicleId,
    });
    this.deployment = new ModelDeployment(this.options.stateDir, this.log);
    this.outbox = new Outbox(this.options.stateDir, this.log);
    this.secure = new SecureParticipant({
      vehicleId: this.vehicleId,
      fleetId: this.fleetId,
      maxMessageBytes: this.options.maxMessageBytes,
      log: this.log,
      publish: (bytes) => this.publishSecure(bytes),
      events: this,
    });
    this.releaseVerifier = new ReleaseVerifier({
      stateDir: this.options.stateDir,
      trustedKeys: this.options.trustedReleaseKeys,
      log: this.log,
    });
    this.releases = new ReleaseHandler({
      deployment: this.deployment,
      downloads: new ReleaseDownloader({
        stateDir: this.options.stateDir,
        topics: this.topics,
        transport: mqttChunkTransport(() => this.client),
        log: this.log,
        counters: this.downloadCounters,
      }),
      log: this.log,
      stats: this.stats,
      events: this,
      isTraining: () => this.isTraining,
      onModelChanged: () => this.onModelChanged(),
    });
    this.shadow = new ShadowModel(
      new ReleaseDownloader({
        stateDir: path.join(this.options.stateDir, SHADOW_DIR),
        topics: this.topics,
        transport: mqttChunkTransport(() => this.client),
        log: this.log,
        counters: createDownloadCounters(),
      }),
      this.log,
    );
    this.candidates = new CandidateTracker({
      vehicleId: this.vehicleId,
      tags: this.options.tags,
      stateDir: this.options.stateDir,
      trustedKeys: this.options.trustedReleaseKeys,
      offer: (release) => this.releases.offer(release),
      // A report once the shadow model is in, so its figures need not
      // wait for the report timer.
      setShadow: (release) =>
        void this.shadow.set(release).then(() => this.reporter?.refresh()),
      log: this.log,
    });
  }

  /** Version of the model in service, undefined before the first one. */
  get deployedVersion(): number | undefined {
    return this.deployment.current?.version;
  }

  /** The training backend, known after `start()`. */
  get backend(): TrainingBackend | undefined {
    return this.trainingBackend;
  }

  /** Number of local frames, known after `start()`. */
  get numExamples(): number {
    return this.frames?.count ?? 0;
  }

  /** True while a round's features are computed or the model trains. */
  get isTraining(): boolean {
    return this.rounds?.isTraining ?? false;
  }

  /** A snapshot of the traffic and outcome counters. */
  get counters(): AgentCounters {
    return {
      ...this.stats,
      outboxPending: this.outbox.pendingCount,
      acksRejected: { ...this.stats.acksRejected },
      releasesRejectedByCode: { ...this.stats.releasesRejectedByCode },
      featureCacheHits: this.featureCache.hits,
      featureCacheMisses: this.featureCache.misses,
    };
  }

  /** A snapshot of the release chunk counters. */
  get releaseDownloads(): DownloadCounters {
    return { ...this.downloadCounters };
  }

  /**
   * Classifies `count` images (NHWC [count,32,32,3], values in [0,1])
   * with the deployed model; returns probabilities [count*43].
   *
   * @throws {FleetError} INVALID_MODEL when no model is deployed.
   */
  classify(images: Float32Array, count: number): Promise<Float32Array> {
    if (this.reporter === undefined) {
      return this.deployment.classify(images, count);
    }
    return this.reporter.classify(images, count);
  }

  /** Version of the model run in shadow mode, undefined when none. */
  get shadowVersion(): number | undefined {
    return this.shadow.model?.version;
  }

  /**
   * Evaluates the loaded models on the held-out frames and publishes an
   * inference report; resolves once it is published or has failed.
   */
  async publishReport(): Promise<void> {
    await this.reporter?.refresh();
  }

  /**
   * Serves the previous model version again, after any deployment in
   * progress. NOTE: a newer retained release that arrives later, for
   * example after a reconnect, is deployed again.
   *
   * @throws {FleetError} INVALID_MODEL when there is no previous version.
   */
  rollback(): Promise<number> {
    return this.releases.rollback();
  }

  /** True while the MQTT client is connected to the broker. */
  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  /**
   * Loads frames, selects the training backend, restores the deployed
   * model and creates the MQTT client. It resolves without waiting for the
   * broker: the client connects in the background and retries every 2 s
   * while the broker is unreachable, logging the retries at warn. On each
   * connection the agent subscribes if needed, publishes the ONLINE status
   * and emits 'connected'.
   *
   * @throws {FleetError} DATA_NOT_FOUND or INVALID_IMAGE for the frames.
   */
  start(): Promise<void> {
    if (this.state !== 'idle') {
      return Promise.reject(
        new Error(`VehicleAgent.start() called while ${this.state}`),
      );
    }
    this.state = 'starting';
    this.starting = this.startSteps().catch(async (err: unknown) => {
      this.state = 'stopped';
      await this.deployment.close();
      throw err;
    });
    return this.starting;
  }

  private async startSteps(): Promise<void> {
    const started = Date.now();

    const split = holdOutFrames(
      await this.loadFrames(),
      this.options.evalFrames,
    );
    this.frames = split.training;
    this.trainingBackend = await selectTrainingBackend(
      this.log,
      this.options.preferredBackend,
    );
    const restored = await this.deployment.restore();
    if (restored !== undefined) {
      this.log.info(
        { modelVersion: restored.version },
        'deployed model restored',
      );
    }
    this.rounds = this.createRoundRunner(this.frames, this.trainingBackend);
    // Counts the entries left by an earlier run and moves corrupt ones aside.
    await this.outbox.list();
    this.reporter = this.createReporter(split.evaluation);

    this.state = 'running';
    this.client = createBrokerClient({
      brokerUrl: this.options.brokerUrl,
      clientId: `vehicle-${this.vehicleId}`,
      will: {
        topic: this.topics.status(this.vehicleId),
        payload: this.statusBytes(VehicleState.Offline),
      },
      log: this.log,
      security: this.options.security,
      onConnect: () => void this.onConnect(),
    });
    this.client.on('message', (topic, payload) =>
      this.onMessage(topic, payload),
    );
    this.client.on('close', () => this.renewConnectionId());
    this.reporter.start();

    this.log.info(
      {
        brokerUrl: this.options.brokerUrl,
        numExamples: this.frames.count,
        backend: this.trainingBackend,
        modelVersion: this.deployedVersion,
        outboxPending: this.outbox.pendingCount,
        signsUpdates: this.options.updateSigningKey !== undefined,
        updateKeyId: this.options.updateSigningKey?.keyId,
        trustedReleaseKeys: this.options.trustedReleaseKeys?.size ?? 0,
        durationMs: Date.now() - started,
      },
      'agent started',
    );
  }

  /**
   * Aborts a training run in progress without publishing its update,
   * publishes the OFFLINE status when connected, disconnects and closes
   * the models. It finishes within a few seconds even when the broker is
   * down, because every wait on the network or on training has a timeout.
   * A stop during `start()` waits for `start()` first, which does no
   * network I/O.
   */
  async stop(): Promise<void> {
    if (this.state === 'starting') {
      await this.starting?.catch(() => undefined);
    }
    if (this.state !== 'running') return;
    this.state = 'stopped';
    const started = Date.now();
    const runStopped = this.rounds?.stop() ?? Promise.resolve();
    const releasesStopped = this.releases.stop();
    await this.reporter?.stop();

    const [runEnded] = await Promise.all([
      settleWithin(runStopped, RUN_STOP_TIMEOUT_MS),
      this.disconnect(),
    ]);
    if (!runEnded) {
      this.log.warn(
        { timeoutMs: RUN_STOP_TIMEOUT_MS },
        'training still running at stop, its update is dropped',
      );
    }
    if (!(await settleWithin(releasesStopped, RELEASES_STOP_TIMEOUT_MS))) {
      this.log.warn(
        { timeoutMs: RELEASES_STOP_TIMEOUT_MS },
        'release deployment still running at stop',
      );
    }
    await this.shadow.close();
    await this.deployment.close();
    this.log.info({ durationMs: Date.now() - started }, 'agent stopped');
  }

  /**
   * Publishes the OFFLINE status if connected and ends the client. When
   * not connected, the broker has the last will, which is the same
   * OFFLINE status, and the client is ended by force so that no queued
   * message waits for a reconnect.
   */
  private async disconnect(): Promise<void> {
    const client = this.client;
    if (client === undefined) return;
    if (client.connected) {
      const published = client.publishAsync(
        this.topics.status(this.vehicleId),
        Buffer.from(this.statusBytes(VehicleState.Offline)),
        { qos: 1, retain: true },
      );
      try {
        if (!(await settleWithin(published, OFFLINE_PUBLISH_TIMEOUT_MS))) {
          this.log.warn(
            { timeoutMs: OFFLINE_PUBLISH_TIMEOUT_MS },
            'offline status not acknowledged in time',
          );
        }
      } catch (err) {
        this.log.warn({ err }, 'offline status not published');
      }
    } else {
      this.log.info(
        { brokerUrl: this.options.brokerUrl },
        'broker not connected at stop, offline status left to last will',
      );
    }
    await endClient(client, DISCONNECT_TIMEOUT_MS);
  }

  /**
   * Subscribes on every connection, publishes the ONLINE status and then
   * publishes every outbox entry again. Subscribing again is harmless with
   * a persistent session, and it repairs subscriptions that an earlier
   * connection lost before the broker confirmed them.
   */
  private async onConnect(): Promise<void> {
    const client = this.client;
    if (client === undefined || this.state !== 'running') return;
    // Before the release topic delivers a notice, so that only a download
    // from an earlier connection requests its chunks again.
    this.releases.onConnected();
    this.shadow.onConnected();
    try {
      await client.subscribeAsync(
        subscriptionsOf([
          this.topics.release(),
          this.topics.candidateRelease(),
          this.topics.roundTask(),
          this.topics.ack(this.vehicleId),
          this.topics.secureToVehicle(this.vehicleId),
        ]),
      );
    } catch (err) {
      // The next connection tries again.
      this.log.warn({ err }, 'subscription failed');
      return;
    }
    await this.publishStatus();
    if (this.state !== 'running') return;
    this.log.info({ brokerUrl: this.options.brokerUrl }, 'agent connected');
    this.emit('connected');
    void this.reporter?.refresh();
    await this.resendOutbox();
  }

  /**
   * Publishes every outbox entry again with QoS 1, oldest first. An entry
   * the aggregator already counted comes back REJECTED with
   * DUPLICATE_UPDATE (or ROUND_CLOSED), which removes it like any ack.
   */
  private async resendOutbox(): Promise<void> {
    let entries;
    try {
      entries = await this.outbox.list();
    } catch (err) {
      this.log.error({ err }, 'outbox not readable');
      return;
    }
    for (const { updateId, round, payload } of entries) {
      const client = this.client;
      if (client === undefined || this.state !== 'running') return;
      try {
        await client.publishAsync(
          this.topics.update(this.vehicleId),
          Buffer.from(payload),
          { qos: 1 },
        );
      } catch (err) {
        // The entry stays, and the next connection sends it again.
        this.log.warn({ err, updateId, round }, 'update resend failed');
        return;
      }
      this.stats.bytesSent += payload.length;
      this.stats.updatesResent += 1;
      this.log.info(
        { updateId, round, bytes: payload.length },
        'update resent from outbox',
      );
      this.emit('update-resent', { updateId, round, bytes: payload.length });
    }
  }

  /** Removes the acknowledged update from the outbox and logs the outcome. */
  private async settleOutbox(ack: UpdateAck): Promise<void> {
    const { updateId, round } = ack;
    const reasonCode = ack.reasonCode || undefined;
    try {
      const removed = await this.outbox.remove(updateId);
      this.log.info(
        {
          updateId,
          round,
          accepted: ack.status === AckStatus.Accepted,
          reasonCode,
          removed,
        },
        'outbox entry acknowledged',
      );
    } catch (err) {
      this.log.error({ err, updateId, round }, 'outbox entry not removed');
    }
  }

  private async loadFrames(): Promise<LabelledImages> {
    if (this.options.frames !== undefined) return this.options.frames;
    return loadLabelledImages(this.options.dataDir!, {
      split: 'train',
      limit: this.options.dataLimit,
    });
  }

  private createRoundRunner(
    frames: LabelledImages,
    backend: TrainingBackend,
  ): RoundRunner {
    return new RoundRunner({
      vehicleId: this.vehicleId,
      fleetId: this.fleetId,
      frames,
      backend,
      featureCache: this.featureCache,
      baseSeed: this.options.seed,
      maxMessageBytes: this.options.maxMessageBytes,
      signingKey: this.options.updateSigningKey,
      attack: this.options.attack,
      log: this.log,
      errorFeedbackFile: path.join(this.options.stateDir, ERROR_FEEDBACK_FILE),
      finishedRounds: new FinishedRounds(
        path.join(this.options.stateDir, FINISHED_ROUNDS_FILE),
        this.log,
      ),
      waitForModel: (task, signal) => this.releases.waitForModel(task, signal),
      beforeTraining: () => this.releases.flush(),
      afterTraining: () => this.releases.afterTraining(),
      publishUpdate: (payload, update) => this.publishUpdate(payload, update),
      publishStatus: () => this.publishStatus(),
      events: this,
      secure: this.secure,
    });
  }

  /** Publishes a secure aggregation message with QoS 1. */
  private async publishSecure(bytes: Uint8Array): Promise<void> {
    const client = this.client;
    if (client === undefined) {
      throw new Error('secure message not sent: the agent is not started');
    }
    this.stats.bytesSent += bytes.length;
    await client.publishAsync(
      this.topics.secureFromVehicle(this.vehicleId),
      Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength),
      { qos: 1 },
    );
  }

  private onMessage(topic: string, payload: Buffer): void {
    if (this.state !== 'running') return;
    if (payload.length === 0) {
      this.log.debug({ topic }, 'empty retained message ignored');
      return;
    }
    try {
      this.dispatch(topic, payload);
    } catch (err) {
      // Handlers reject bad input themselves; this keeps an unexpected
      // failure from reaching the MQTT client's event loop.
      this.log.error({ err, topic }, 'message handling failed');
    }
  }

  private dispatch(topic: string, payload: Buffer): void {
    const chunk = this.topics.releaseChunkOf(topic);
    if (topic === this.topics.release()) {
      this.stats.bytesReceived += payload.length;
      this.handleRelease(payload);
    } else if (topic === this.topics.candidateRelease()) {
      this.stats.bytesReceived += payload.length;
      this.handleCandidate(payload);
    } else if (chunk !== undefined) {
      this.stats.bytesReceived += payload.length;
      this.releases.handleChunk(chunk.version, chunk.index, payload);
      this.shadow.handleChunk(chunk.version, chunk.index, payload);
    } else if (topic === this.topics.roundTask()) {
      this.stats.bytesReceived += payload.length;
      this.handleRoundTask(payload);
    } else if (topic === this.topics.ack(this.vehicleId)) {
      this.handleAck(payload);
    } else if (topic === this.topics.secureToVehicle(this.vehicleId)) {
      this.stats.bytesReceived += payload.length;
      this.secure.handle(payload);
    } else {
      this.log.debug({ topic }, 'message on unexpected topic ignored');
    }
  }

  private rejectInput(topic: string, err: unknown): void {
    if (isFleetError(err, ErrorCode.MalformedPayload)) {
      this.stats.malformedMessages += 1;
    }
    this.log.warn(
      { err, topic, code: (err as { code?: string }).code },
      'message rejected',
    );
  }

  /**
   * Checks the notice (signature, key and sequence when release keys are
   * trusted) and offers it. A rejected notice is counted and logged, and
   * the model in service stays.
   */
  private handleRelease(payload: Buffer): void {
    let release: ModelRelease;
    try {
      // The cohort check runs before the sequence is recorded, so that a
      // candidate notice copied onto this topic cannot advance it.
      release = this.releaseVerifier.open(payload, (notice) =>
        this.candidates.checkStable(notice),
      );
    } catch (err) {
      if (isFleetError(err, ErrorCode.MalformedPayload)) {
        this.stats.malformedMessages += 1;
      }
      this.releases.reject(err, claimedVersionOf(payload));
      return;
    }
    this.candidates.onStable(release);
  }

  /**
   * Checks a candidate notice like a release notice, with its own
   * sequence record, and lets the candidate tracker decide whether this
   * vehicle is in its cohort.
   */
  private handleCandidate(payload: Buffer): void {
    try {
      this.candidates.onCandidatePayload(payload);
      // Fresh figures for the controller's new stage, which counts only
      // reports made after the stage began.
      void this.reporter?.refresh();
    } catch (err) {
      if (isFleetError(err, ErrorCode.MalformedPayload)) {
        this.stats.malformedMessages += 1;
      }
      this.releases.reject(err, claimedVersionOf(payload));
    }
  }

  /** After a deployment or rollback: status, then a fresh report. */
  private async onModelChanged(): Promise<void> {
    await this.publishStatus();
    void this.reporter?.refresh();
  }

  private createReporter(
    evaluation: LabelledImages | undefined,
  ): InferenceReporter {
    return new InferenceReporter({
      vehicleId: this.vehicleId,
      tags: this.options.tags,
      deployment: this.deployment,
      shadow: this.shadow,
      frames: evaluation,
      intervalMs: this.options.reportIntervalMs,
      publish: (bytes) =>
        this.publishRetained(this.topics.report(this.vehicleId), bytes),
      rolloutId: () => this.candidates.rolloutId,
      events: this,
      log: this.log,
    });
  }

  /** Publishes a retained QoS 1 message, bounded like a status publish. */
  private async publishRetained(
    topic: string,
    bytes: Uint8Array,
  ): Promise<void> {
    const client = this.client;
    if (client === undefined || this.state !== 'running') return;
    const published = client.publishAsync(
      topic,
      Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength),
      { qos: 1, retain: true },
    );
    if (!(await settleWithin(published, STATUS_PUBLISH_TIMEOUT_MS))) {
      this.log.debug(
        { topic, timeoutMs: STATUS_PUBLISH_TIMEOUT_MS },
        'report not acknowledged in time',
      );
    }
  }

  private handleRoundTask(payload: Buffer): void {
    const topic = this.topics.roundTask();
    let task: RoundTask;
    try {
      task = decodeRoundTask(payload);
    } catch (err) {
      this.rejectInput(topic, err);
      return;
    }
    this.rounds!.offer(task);
  }

  /** Stores the update in the outbox first, so a crash cannot lose it. */
  private async publishUpdate(
    payload: Uint8Array,
    update: { updateId: string; round: number },
  ): Promise<void> {
    await this.outbox.add(update.updateId, update.round, payload);
    await this.client!.publishAsync(
      this.topics.update(this.vehicleId),
      Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength),
      { qos: 1 },
    );
    this.stats.bytesSent += payload.length;
    this.stats.updatesSent += 1;
  }

  private handleAck(payload: Buffer): void {
    let ack: UpdateAck;
    try {
      ack = decodeUpdateAck(payload);
    } catch (err) {
      this.rejectInput(this.topics.ack(this.vehicleId), err);
      return;
    }
    const sent = this.rounds!.takeSentUpdate(ack.updateId);
    if (recordAck(ack, sent, this.stats, this.log)) {
      void this.resynchronise(ack.currentRound, ack.currentModelVersion);
    }
    // Every ack settles the update: ACCEPTED counted it, DUPLICATE_UPDATE
    // means an earlier send was counted, and any other rejection would
    // repeat on a resend. 'ack' is emitted once the entry is removed.
    void this.settleOutbox(ack).then(() => this.emit('ack', ack));
  }

  /**
   * Subscribes again to the round and release topics, so that the broker
   * sends their retained messages and the agent catches up with the
   * aggregator's current round and model. A repeated SUBSCRIBE replaces
   * the subscription and resends the retained messages, so there is no
   * moment without a subscription. When it fails, the next connection
   * subscribes again.
   */
  private async resynchronise(
    currentRound: number,
    currentModelVersion: number,
  ): Promise<void> {
    const client = this.client;
    if (client === undefined || this.state !== 'running') return;
    this.log.info(
      {
        round: currentRound,
        modelVersion: currentModelVersion,
        deployedVersion: this.deployedVersion,
      },
      'resynchronising with aggregator',
    );
    const filters = [this.topics.release(), this.topics.roundTask()];
    try {
      await client.subscribeAsync(subscriptionsOf(filters));
    } catch (err) {
      this.log.warn({ err }, 'resynchronisation failed');
    }
  }

  /**
   * Gives the next connection a new, higher id, and puts it in the last
   * will that mqtt.js sends with the next CONNECT. A retained OFFLINE
   * status of the closed connection then reads as older than the statuses
   * of the next one.
   */
  private renewConnectionId(): void {
    this.connectionId = Math.max(Date.now(), this.connectionId + 1);
    const will = this.client?.options.will;
    if (will !== undefined) {
      will.payload = Buffer.from(this.statusBytes(VehicleState.Offline));
    }
  }

  private statusBytes(state: number): Uint8Array {
    const model = this.deployment.current;
    return encodeVehicleStatus({
      vehicleId: this.vehicleId,
      state,
      modelName: model?.modelName ?? '',
      modelVersion: model?.version ?? 0,
      numExamples: this.frames?.count ?? 0,
      updatedAtMs: Date.now(),
      backend: this.trainingBackend ?? '',
      connectionId: this.connectionId,
    });
  }

  /** Publishes the retained status: TRAINING or ONLINE. */
  private async publishStatus(): Promise<void> {
    const client = this.client;
    if (client === undefined || this.state !== 'running') return;
    const state = this.isTraining ? VehicleState.Training : VehicleState.Online;
    try {
      const published = client.publishAsync(
        this.topics.status(this.vehicleId),
        Buffer.from(this.statusBytes(state)),
        { qos: 1, retain: true },
      );
      if (!(await settleWithin(published, STATUS_PUBLISH_TIMEOUT_MS))) {
        this.log.debug(
          { state, timeoutMs: STATUS_PUBLISH_TIMEOUT_MS },
          'status not acknowledged in time',
        );
      }
    } catch (err) {
      this.log.warn({ err, state }, 'status not published');
    }
  }
}

/**
 * Builds a QoS 1 subscription of `filters` that mqtt.js sends even when
 * it has them already. Without `resubscribe`, mqtt.js skips a filter it
 * has subscribed at that QoS, and the broker would not resend retained
 * messages.
 */
function subscriptionsOf(filters: string[]): ISubscriptionMap {
  const map = Object.fromEntries(
    filters.map((filter) => [filter, { qos: 1 as const }]),
  );
  // The mqtt.js type cannot express the flag beside the index signature.
  return Object.assign(map, { resubscribe: true }) as ISubscriptionMap;
}
