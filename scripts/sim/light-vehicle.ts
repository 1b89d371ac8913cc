/**
 * A light simulated vehicle: the real MQTT protocol of a vehicle agent
 * without its training, model download or disk state, so that a thousand
 * of them fit in one Node.js process. It sends a perturbed copy of a
 * precomputed update (see light-deltas.ts) against the task's model
 * version, which it never loads.
 */
import { EventEmitter } from 'node:events';
import mqtt, { type ISubscriptionMap, type MqttClient } from 'mqtt';
import {
  AckStatus,
  FleetTopics,
  VehicleState,
  decodeRoundTask,
  decodeUpdateAck,
  encodeVehicleStatus,
  isFleetError,
  type Logger,
  type RoundTask,
} from '../../protocol/index.ts';
import { endClient, settleWithin } from '../../protocol/mqtt-end.ts';
import { createRandom } from '../../models/index.ts';
import {
  encodeLightUpdate,
  perturbationSeed,
  unsupportedTaskReason,
  type DeltaTemplate,
} from './light-deltas.ts';

/** Time `stop()` waits for the OFFLINE status to be acknowledged. */
const OFFLINE_PUBLISH_TIMEOUT_MS = 2000;
/** Time `stop()` waits for a graceful MQTT disconnect. */
const DISCONNECT_TIMEOUT_MS = 2000;
/** Reconnection delay; mqtt.js retries at this period. */
const RECONNECT_PERIOD_MS = 2000;

/** Grants a vehicle the right to publish an update; see PublishGate. */
export interface UpdateGate {
  /** Resolves with a release function once an update may go out. */
  acquire(): Promise<() => void>;
}

/** Options of {@link LightVehicle}. */
export interface LightVehicleOptions {
  vehicleId: string;
  fleetId: string;
  brokerUrl: string;
  /** Updates to send copies of; the vehicle picks one by its seed. */
  templates: readonly DeltaTemplate[];
  /** Run seed; perturbations, example counts and delays derive from it. */
  seed: number;
  /** The update's publish is delayed by a seeded time in [0, this). */
  publishWindowMs: number;
  /** An unanswered update frees its gate slot after this long. */
  ackTimeoutMs: number;
  maxMessageBytes: number;
  gate: UpdateGate;
  log: Logger;
}

/** Ack of an update, as the vehicle received it. */
export interface LightAckEvent {
  vehicleId: string;
  round: number;
  updateId: string;
  accepted: boolean;
  /** Reason code of a rejection, '' when accepted. */
  reasonCode: string;
  /** Milliseconds from publishing the update to its ack. */
  latencyMs: number;
}

/** Events of a light vehicle. */
export interface LightVehicleEvents {
  /** An update was published and its PUBACK arrived. */
  'update-sent': [{ vehicleId: string; round: number; bytes: number }];
  ack: [LightAckEvent];
  /** An ack that names no update this vehicle has in flight. */
  'unexpected-ack': [{ vehicleId: string; updateId: string }];
  /** No ack within ackTimeoutMs. */
  'ack-timeout': [{ vehicleId: string; round: number; updateId: string }];
  /** A task this vehicle was selected for but cannot send an update for. */
  'task-skipped': [{ vehicleId: string; round: number; reason: string }];
  /** Every connection after the first. */
  reconnected: [];
}

/** An update published and not yet acked. */
interface PendingUpdate {
  round: number;
  sentAtMs: number;
  release: () => void;
  timer: NodeJS.Timeout;
}

/**
 * One light vehicle. `start()` connects with a persistent session under
 * the client id `vehicle-<id>`, an OFFLINE last will, subscribes to the
 * round task and its ack topic and publishes a retained ONLINE status,
 * as the real agent does.
 */
export class LightVehicle extends EventEmitter<LightVehicleEvents> {
  readonly vehicleId: string;
  readonly #options: LightVehicleOptions;
  readonly #topics: FleetTopics;
  readonly #log: Logger;
  readonly #handledRounds = new Set<number>();
  readonly #pending = new Map<string, PendingUpdate>();
  readonly #timers = new Set<NodeJS.Timeout>();
  #client: MqttClient | undefined;
  #connectionId = 0;
  #connections = 0;
  #isStopped = false;

  constructor(options: LightVehicleOptions) {
    super();
    if (options.templates.length === 0) {
      throw new RangeError(
        `light vehicle ${options.vehicleId} has no delta templates, ` +
          'expected at least 1',
      );
    }
    this.#options = options;
    this.vehicleId = options.vehicleId;
    this.#topics = new FleetTopics(options.fleetId);
    // Checks the id: it must be one topic level.
    this.#topics.status(options.vehicleId);
    this.#log = options.log.child({ vehicleId: options.vehicleId });
  }

  /** Updates published and not yet acked. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /**
   * Connects and resolves once the ONLINE status is acknowledged, or
   * rejects after `timeoutMs`. The client keeps reconnecting afterwards.
   */
  async start(timeoutMs: number): Promise<void> {
    if (this.#client !== undefined) {
      throw new Error(`light vehicle ${this.vehicleId} started twice`);
    }
    this.#connectionId = Date.now();
    const client = mqtt.connect(this.#options.brokerUrl, {
      protocolVersion: 4,
      clientId: `vehicle-${this.vehicleId}`,
      clean: false,
      reconnectPeriod: RECONNECT_PERIOD_MS,
      connectTimeout: timeoutMs,
      will: {
        topic: this.#topics.status(this.vehicleId),
        payload: Buffer.from(this.#statusBytes(VehicleState.Offline)),
        qos: 1,
        retain: true,
      },
    });
    this.#client = client;
    client.on('message', (topic, payload) => this.#onMessage(topic, payload));
    client.on('close', () => this.#renewConnectionId());
    client.on('error', (err) => {
      this.#log.debug({ err }, 'mqtt client error');
    });
    const online = new Promise<void>((resolve) => {
      client.on('connect', () => {
        this.#onConnect().then((ok) => {
          if (ok) resolve();
        });
      });
    });
    if (!(await settleWithin(online, timeoutMs))) {
      throw new Error(
        `light vehicle ${this.vehicleId} did not connect to ` +
          `${this.#options.brokerUrl} within ${timeoutMs} ms`,
      );
    }
  }

  /**
   * Cancels planned publishes, publishes the OFFLINE status when
   * connected and ends the client. Safe to call twice.
   */
  async stop(): Promise<void> {
    if (this.#isStopped) return;
    this.#isStopped = true;
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    for (const pending of this.#pending.values()) {
      clearTimeout(pending.timer);
      pending.release();
    }
    this.#pending.clear();
    const client = this.#client;
    if (client === undefined) return;
    if (client.connected) {
      const published = client.publishAsync(
        this.#topics.status(this.vehicleId),
        Buffer.from(this.#statusBytes(VehicleState.Offline)),
        { qos: 1, retain: true },
      );
      await settleWithin(published, OFFLINE_PUBLISH_TIMEOUT_MS).catch(
        (err: unknown) => this.#log.debug({ err }, 'offline status failed'),
      );
    }
    await endClient(client, DISCONNECT_TIMEOUT_MS);
  }

  /** Subscribes and publishes ONLINE; returns false when either failed. */
  async #onConnect(): Promise<boolean> {
    const client = this.#client;
    if (client === undefined || this.#isStopped) return false;
    this.#connections += 1;
    if (this.#connections > 1) this.emit('reconnected');
    try {
      await client.subscribeAsync(
        subscriptionsOf([
          this.#topics.roundTask(),
          this.#topics.ack(this.vehicleId),
        ]),
      );
      await client.publishAsync(
        this.#topics.status(this.vehicleId),
        Buffer.from(this.#statusBytes(VehicleState.Online)),
        { qos: 1, retain: true },
      );
      return true;
    } catch (err) {
      // The next connection subscribes and publishes again.
      this.#log.warn({ err }, 'light vehicle setup failed');
      return false;
    }
  }

  #onMessage(topic: string, payload: Buffer): void {
    if (topic === this.#topics.roundTask()) {
      if (payload.byteLength > 0) this.#onRoundTask(payload);
    } else if (topic === this.#topics.ack(this.vehicleId)) {
      this.#onAck(payload);
    }
  }

  #onRoundTask(payload: Buffer): void {
    let task: RoundTask;
    try {
      task = decodeRoundTask(payload);
    } catch (err) {
      if (!isFleetError(err)) throw err;
      this.#log.warn({ code: err.code, err }, 'round task rejected');
      return;
    }
    const selected =
      task.selectedVehicles.length === 0 ||
      task.selectedVehicles.includes(this.vehicleId);
    const isNew = !this.#handledRounds.has(task.round);
    if (task.fleetId !== this.#options.fleetId || !selected || !isNew) return;
    this.#handledRounds.add(task.round);

    const reason = unsupportedTaskReason(task, Date.now());
    if (reason !== undefined) {
      this.#log.warn({ round: task.round, reason }, 'round task skipped');
      this.#skip(task.round, reason);
      return;
    }
    const random = createRandom(
      perturbationSeed(this.#options.seed + 1, this.vehicleId, task.round),
    );
    const delayMs = Math.floor(random() * this.#options.publishWindowMs);
    const timer = setTimeout(() => {
      this.#timers.delete(timer);
      this.#publishUpdate(task, random).catch((err: unknown) => {
        this.#log.warn({ err, round: task.round }, 'update publish failed');
      });
    }, delayMs);
    this.#timers.add(timer);
  }

  async #publishUpdate(task: RoundTask, random: () => number): Promise<void> {
    const release = await this.#options.gate.acquire();
    const client = this.#client;
    if (this.#isStopped || client === undefined) {
      release();
      return;
    }
    let encoded: { updateId: string; bytes: Uint8Array };
    try {
      encoded = encodeLightUpdate({
        task,
        vehicleId: this.vehicleId,
        templates: this.#options.templates,
        seed: this.#options.seed,
        random,
        maxMessageBytes: this.#options.maxMessageBytes,
      });
    } catch (err) {
      release();
      this.#log.warn({ err, round: task.round }, 'update not built');
      this.#skip(task.round, (err as Error).message);
      return;
    }

    const { updateId, bytes } = encoded;
    const timer = setTimeout(
      () => this.#onAckTimeout(updateId),
      this.#options.ackTimeoutMs,
    );
    this.#pending.set(updateId, {
      round: task.round,
      sentAtMs: Date.now(),
      release,
      timer,
    });
    // Wrapped without a copy: the payload is dropped after the PUBACK.
    const payload = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length);
    await client.publishAsync(this.#topics.update(this.vehicleId), payload, {
      qos: 1,
    });
    this.emit('update-sent', {
      vehicleId: this.vehicleId,
      round: task.round,
      bytes: payload.byteLength,
    });
  }

  #skip(round: number, reason: string): void {
    this.emit('task-skipped', { vehicleId: this.vehicleId, round, reason });
  }

  #onAck(payload: Buffer): void {
    let ack;
    try {
      ack = decodeUpdateAck(payload);
    } catch (err) {
      if (!isFleetError(err)) throw err;
      this.#log.warn({ code: err.code, err }, 'ack rejected');
      return;
    }
    const pending = this.#pending.get(ack.updateId);
    if (pending === undefined) {
      this.emit('unexpected-ack', {
        vehicleId: this.vehicleId,
        updateId: ack.updateId,
      });
      return;
    }
    this.#pending.delete(ack.updateId);
    clearTimeout(pending.timer);
    pending.release();
    const accepted = ack.status === AckStatus.Accepted;
    if (!accepted) {
      this.#log.warn(
        { round: ack.round, code: ack.reasonCode, reason: ack.reason },
        'update rejected',
      );
    }
    this.emit('ack', {
      vehicleId: this.vehicleId,
      round: pending.round,
      updateId: ack.updateId,
      accepted,
      reasonCode: accepted ? '' : ack.reasonCode,
      latencyMs: Date.now() - pending.sentAtMs,
    });
  }

  #onAckTimeout(updateId: string): void {
    const pending = this.#pending.get(updateId);
    if (pending === undefined) return;
    this.#pending.delete(updateId);
    pending.release();
    this.#log.warn({ round: pending.round, updateId }, 'ack timed out');
    this.emit('ack-timeout', {
      vehicleId: this.vehicleId,
      round: pending.round,
      updateId,
    });
  }

  /**
   * Gives the next connection a higher id and puts it in the last will,
   * so that the retained will of a closed connection reads as older than
   * the next connection's statuses.
   */
  #renewConnectionId(): void {
    this.#connectionId = Math.max(Date.now(), this.#connectionId + 1);
    const will = this.#client?.options.will;
    if (will !== undefined) {
      will.payload = Buffer.from(this.#statusBytes(VehicleState.Offline));
    }
  }

  #statusBytes(state: number): Uint8Array {
    return encodeVehicleStatus({
      vehicleId: this.vehicleId,
      state,
      modelName: '',
      modelVersion: 0,
      numExamples: this.#options.templates[0].numExamples,
      updatedAtMs: Date.now(),
      backend: 'light-template',
      connectionId: this.#connectionId,
    });
  }
}

/**
 * Builds a QoS 1 subscription that mqtt.js sends even when it has it already,
 * so that the broker resends the retained round task on a reconnect.
 */
function subscriptionsOf(filters: string[]): ISubscriptionMap {
  const map = Object.fromEntries(
    filters.map((filter) => [filter, { qos: 1 as const }]),
  );
  // The mqtt.js type cannot express the flag beside the index signature.
  return Object.assign(map, { resubscribe: true }) as ISubscriptionMap;
}
