/**
 * The staged rollout controller: publishes a stored model version to a
 * growing cohort, reads the vehicles' inference reports, and promotes or
 * rolls back by the gates. Its state file lets a restart resume the
 * stage it was in.
 */
import { randomBytes } from 'node:crypto';
import type { MqttClient } from 'mqtt';
import { connectToBroker } from '../../aggregator/connection.ts';
import { ModelStore, type StoredModel } from '../../aggregator/model-store.ts';
import { ReleaseSigner } from '../../aggregator/release-signer.ts';
import { MODEL_NAME } from '../../models/architecture.ts';
import {
  CandidateState,
  ErrorCode,
  FleetError,
  FleetTopics,
  decodeModelRelease,
  decodeSignedRelease,
  decodeVehicleReport,
  type BrokerClientSecurity,
  type Logger,
  type ModelRelease,
  type SigningKey,
  type VehicleReport,
} from '../../protocol/index.ts';
import { endClient } from '../../protocol/mqtt-end.ts';
import {
  checkGates,
  evaluateGates,
  type GateEvaluation,
  type GateThresholds,
} from './gates.ts';
import { NoticePublisher, candidateOf } from './notices.ts';
import {
  STATE_FORMAT,
  readState,
  writeState,
  type RolloutEvent,
  type RolloutStage,
  type RolloutState,
  type RolloutStatus,
} from './state.ts';

/** Options of {@link RolloutController}. */
export interface RolloutControllerOptions {
  fleetId: string;
  brokerUrl: string;
  security?: BrokerClientSecurity;
  /** MQTT client id; default `rollout-<fleetId>`. */
  clientId?: string;
  /** State directory holding the model store (the aggregator's). */
  modelStateDir: string;
  /** Directory of rollout.json and the signer's sequence record. */
  rolloutDir: string;
  /** Release key; without it notices go out unsigned (development). */
  signingKey?: SigningKey;
  maxMessageBytes: number;
  log: Logger;
}

/** Inputs of `start`. */
export interface StartRequest {
  version: number;
  stages: RolloutStage[];
  cohortTags: Record<string, string>;
  vehicleIds: string[];
  gates: GateThresholds;
  /** Salt of the cohort hash; default a random one. */
  hashSalt?: string;
}

/** Time `start` waits for the retained fleet-wide release notice. */
const STABLE_WAIT_MS = 5000;

/** Controls one fleet's staged rollouts. */
export class RolloutController {
  private readonly topics: FleetTopics;
  private readonly store: ModelStore;
  private readonly log: Logger;
  private readonly abort = new AbortController();
  private client: MqttClient | undefined;
  private publisher: NoticePublisher | undefined;
  private readonly reports = new Map<string, VehicleReport>();
  private stable: ModelRelease | undefined;
  private state: RolloutState | undefined;

  constructor(private readonly options: RolloutControllerOptions) {
    this.topics = new FleetTopics(options.fleetId);
    this.store = new ModelStore(options.modelStateDir, MODEL_NAME);
    this.log = options.log.child({ component: 'rollout' });
    this.state = readState(options.rolloutDir);
  }

  /** The rollout state, undefined before the first `start`. */
  get current(): RolloutState | undefined {
    return this.state;
  }

  /** Latest report of every vehicle seen. */
  get latestReports(): VehicleReport[] {
    return [...this.reports.values()];
  }

  /** Connects, and subscribes to the reports and the release topic. */
  async connect(): Promise<void> {
    const signer =
      this.options.signingKey === undefined
        ? undefined
        : new ReleaseSigner(
            this.options.signingKey,
            this.options.rolloutDir,
            this.log,
          );
    this.client = await connectToBroker({
      brokerUrl: this.options.brokerUrl,
      // The id the broker accepts for the aggregator identity's second
      // client, so that the controller can use the aggregator's files.
      clientId:
        this.options.clientId ?? `aggregator-${this.options.fleetId}-rollout`,
      subscriptions: [this.topics.allReports(), this.topics.release()],
      onMessage: (topic, payload) => this.onMessage(topic, payload),
      signal: this.abort.signal,
      log: this.log,
      security: this.options.security,
    });
    const client = this.client;
    this.publisher = new NoticePublisher({
      topics: this.topics,
      maxMessageBytes: this.options.maxMessageBytes,
      signer,
      publish: async (topic, payload) => {
        await client.publishAsync(topic, Buffer.from(payload), {
          qos: 1,
          retain: true,
        });
      },
    });
  }

  /** Disconnects. */
  async close(): Promise<void> {
    this.abort.abort();
    if (this.client !== undefined) await endClient(this.client, 2000);
    this.client = undefined;
  }

  private onMessage(topic: string, payload: Buffer): void {
    if (payload.length === 0) return;
    try {
      if (topic === this.topics.release()) {
        const envelope = decodeSignedRelease(payload);
        this.stable = decodeModelRelease(envelope?.signedBytes ?? payload);
        return;
      }
      const report = decodeVehicleReport(payload);
      const vehicleId = this.topics.vehicleIdOf(topic);
      if (report.vehicleId !== vehicleId) {
        this.log.warn(
          { topic, vehicleId: report.vehicleId },
          'report for another vehicle ignored',
        );
        return;
      }
      this.reports.set(vehicleId, report);
    } catch (err) {
      this.log.warn({ err, topic }, 'message rejected');
    }
  }

  /** Waits for the retained fleet-wide notice. */
  private async waitForStable(): Promise<ModelRelease> {
    const stopAt = Date.now() + STABLE_WAIT_MS;
    while (this.stable === undefined && Date.now() < stopAt) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    if (this.stable === undefined) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `no fleet-wide release is retained on ${this.topics.release()} ` +
          `after ${STABLE_WAIT_MS} ms; a rollout needs a stable version ` +
          'for vehicles to fall back to',
      );
    }
    return this.stable;
  }

  /**
   * Starts a rollout of stored `version` at its first stage.
   *
   * @throws {FleetError} INVALID_CONFIG while another rollout is active,
   *   or when the version is the stable one; INVALID_MODEL when it is not
   *   stored. RangeError for a bad gate or cohort.
   */
  async start(request: StartRequest): Promise<RolloutState> {
    if (this.state?.status === 'active') {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `rollout ${this.state.rolloutId} of version ${this.state.version} ` +
          'is still active; promote or roll it back first',
      );
    }
    checkGates(request.gates);
    const model = this.store.load(request.version);
    const stable = await this.waitForStable();
    if (stable.sha256 === model.manifest.sha256) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `version ${request.version} is already the fleet-wide release`,
      );
    }
    const nowMs = Date.now();
    const rolloutId = `v${request.version}-${nowMs.toString(36)}`;
    this.state = {
      format: STATE_FORMAT,
      fleetId: this.options.fleetId,
      modelName: MODEL_NAME,
      rolloutId,
      hashSalt: request.hashSalt ?? randomBytes(8).toString('hex'),
      version: request.version,
      sha256: model.manifest.sha256,
      stableVersion: stable.version,
      stableSha256: stable.sha256,
      stages: request.stages,
      stageIndex: 0,
      stageStartedAtMs: nowMs,
      cohortTags: { ...request.cohortTags },
      vehicleIds: [...request.vehicleIds],
      status: 'active',
      gates: { ...request.gates },
      history: [],
    };
    this.record({ event: 'started', stage: 0, version: request.version });
    await this.publishStage(model);
    return this.state;
  }

  /** Publishes the candidate notice of the current stage again. */
  async resume(): Promise<void> {
    const state = this.requireActive();
    await this.publishStage(this.store.load(state.version));
  }

  /**
   * Moves to the next stage, or after the last one makes the version the
   * fleet-wide release.
   */
  async promote(reason = 'manual'): Promise<RolloutState> {
    const state = this.requireActive();
    const model = this.store.load(state.version);
    if (state.stageIndex + 1 < state.stages.length) {
      state.stageIndex += 1;
      state.stageStartedAtMs = Date.now();
      this.record({ event: 'stage', stage: state.stageIndex, reason });
      await this.publishStage(model);
      return state;
    }
    state.status = 'promoted';
    this.record({ event: 'promoted', version: state.version, reason });
    await this.publisher!.publishStable(model);
    await this.publisher!.publishCandidateState(
      model,
      candidateOf(state, CandidateState.Promoted),
    );
    this.log.info(
      { modelVersion: state.version, rolloutId: state.rolloutId, reason },
      'rollout promoted to the fleet',
    );
    return state;
  }

  /**
   * Withdraws the candidate: cohort vehicles switch back to the stable
   * version they kept, and the candidate's chunks are cleared.
   */
  async rollback(reason = 'manual'): Promise<RolloutState> {
    const state = this.requireActive();
    const model = this.store.load(state.version);
    state.status = 'rolled-back';
    this.record({ event: 'rolled-back', stage: state.stageIndex, reason });
    await this.publisher!.publishCandidateState(
      model,
      candidateOf(state, CandidateState.Withdrawn),
    );
    if (model.manifest.sha256 !== this.stable?.sha256) {
      await this.publisher!.clearChunks(model);
    }
    this.log.warn(
      {
        modelVersion: state.version,
        rolloutId: state.rolloutId,
        stage: state.stageIndex,
        reason,
      },
      'rollout rolled back',
    );
    return state;
  }

  /**
   * Publishes stored `version` as the fleet-wide release at once, and
   * ends an active rollout (promoted when it is the candidate, withdrawn
   * otherwise).
   */
  async pin(version: number, reason = 'manual'): Promise<void> {
    if (this.publisher === undefined) {
      throw new Error('RolloutController.connect() must run first');
    }
    const model = this.store.load(version);
    await this.publisher!.publishStable(model);
    const state = this.state;
    if (state?.status === 'active') {
      const isCandidate = state.version === version;
      const candidate = this.store.load(state.version);
      await this.publisher!.publishCandidateState(
        candidate,
        candidateOf(
          state,
          isCandidate ? CandidateState.Promoted : CandidateState.Withdrawn,
        ),
      );
      state.status = 'pinned';
      this.record({ event: 'pinned', version, reason });
    }
    this.log.info(
      { modelVersion: version, reason },
      'version pinned fleet-wide',
    );
  }

  /** Evaluates the gates once and acts on the decision. */
  async tick(nowMs = Date.now()): Promise<GateEvaluation | undefined> {
    const state = this.state;
    if (state?.status !== 'active') return undefined;
    const evaluation = evaluateGates({
      reports: this.latestReports,
      candidate: { version: state.version, sha256: state.sha256 },
      stable: { version: state.stableVersion, sha256: state.stableSha256 },
      cohort: candidateOf(state, CandidateState.Active).cohort,
      shadow: state.stages[state.stageIndex].shadow,
      stageStartedAtMs: state.stageStartedAtMs,
      nowMs,
      gates: state.gates,
    });
    state.lastEvaluation = {
      ...evaluation,
      atMs: nowMs,
      stage: state.stageIndex,
    };
    const fields = {
      rolloutId: state.rolloutId,
      stage: state.stageIndex,
      gates: evaluation,
    };
    if (evaluation.decision === 'wait') {
      this.log.debug(fields, 'rollout gates evaluated');
      writeState(this.options.rolloutDir, state);
      return evaluation;
    }
    this.log.info(fields, 'rollout gates evaluated');
    if (evaluation.decision === 'promote')
      await this.promote(evaluation.reason);
    else await this.rollback(evaluation.reason);
    return evaluation;
  }

  /**
   * Evaluates the gates every `intervalMs` until the rollout is no
   * longer active or `signal` aborts; returns the final status.
   */
  async watch(
    intervalMs: number,
    signal?: AbortSignal,
  ): Promise<RolloutStatus | undefined> {
    while (this.state?.status === 'active' && signal?.aborted !== true) {
      await this.tick();
      if (this.state.status !== 'active') break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, intervalMs);
        function done(): void {
          clearTimeout(timer);
          signal?.removeEventListener('abort', done);
          resolve();
        }
        signal?.addEventListener('abort', done, { once: true });
      });
    }
    return this.state?.status;
  }

  private requireActive(): RolloutState {
    if (this.state?.status !== 'active') {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        this.state === undefined
          ? 'no rollout has started; run start VERSION first'
          : `rollout ${this.state.rolloutId} is ${this.state.status}, not active`,
      );
    }
    if (this.publisher === undefined) {
      throw new Error('RolloutController.connect() must run first');
    }
    return this.state;
  }

  /** Writes the state first, then publishes the stage's notice. */
  private async publishStage(model: StoredModel): Promise<void> {
    const state = this.state!;
    writeState(this.options.rolloutDir, state);
    const stage = state.stages[state.stageIndex];
    const sequence = await this.publisher!.publishCandidate(
      model,
      candidateOf(state, CandidateState.Active),
    );
    this.log.info(
      {
        rolloutId: state.rolloutId,
        modelVersion: state.version,
        stableVersion: state.stableVersion,
        stage: state.stageIndex,
        percent: stage.percent,
        shadow: stage.shadow,
        releaseSequence: sequence,
      },
      'rollout stage started',
    );
  }

  private record(event: Omit<RolloutEvent, 'atMs'>): void {
    const state = this.state!;
    state.history.push({ atMs: Date.now(), ...event });
    writeState(this.options.rolloutDir, state);
  }
}
