/**
 * Many light vehicles in one process: connected in batches at a bounded
 * rate, with a shared gate on the updates in flight, and the per-round
 * counts of the updates they sent and the acks they received.
 */
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from '../../protocol/index.ts';
import type { DeltaTemplate } from './light-deltas.ts';
import {
  LightVehicle,
  type LightAckEvent,
  type UpdateGate,
} from './light-vehicle.ts';

/**
 * Counting semaphore on updates in flight. A slot is taken before an
 * update is published and freed when its ack arrives (or times out), so
 * at most `maxPending` updates sit in the broker's and the aggregator's
 * queues at once. 0 means no limit.
 */
export class PublishGate implements UpdateGate {
  readonly #maxPending: number;
  readonly #waiting: Array<() => void> = [];
  #pending = 0;
  #peakPending = 0;

  /** @throws {RangeError} when `maxPending` is not an integer >= 0. */
  constructor(maxPending: number) {
    if (!Number.isInteger(maxPending) || maxPending < 0) {
      throw new RangeError(
        `max pending updates ${maxPending} is invalid, expected an ` +
          'integer >= 0 (0 for no limit)',
      );
    }
    this.#maxPending = maxPending;
  }

  /** Maximum number of slots taken at once so far. */
  get peakPending(): number {
    return this.#peakPending;
  }

  acquire(): Promise<() => void> {
    const isFree = this.#maxPending === 0 || this.#pending < this.#maxPending;
    if (isFree) return Promise.resolve(this.#take());
    return new Promise((resolve) => {
      this.#waiting.push(() => resolve(this.#take()));
    });
  }

  #take(): () => void {
    this.#pending += 1;
    this.#peakPending = Math.max(this.#peakPending, this.#pending);
    let isReleased = false;
    return () => {
      if (isReleased) return;
      isReleased = true;
      this.#pending -= 1;
      this.#waiting.shift()?.();
    };
  }
}

/** Counts of one round, as the vehicles observed it. */
export interface LightRoundCounts {
  round: number;
  /** Updates whose PUBACK arrived. */
  sent: number;
  /** Payload bytes of those updates. */
  uplinkBytes: number;
  acksAccepted: number;
  acksRejected: number;
  rejectedByReason: Record<string, number>;
  ackTimeouts: number;
  tasksSkipped: number;
  /** Median and maximum time from publish to ack. */
  ackLatencyP50Ms: number;
  ackLatencyMaxMs: number;
}

/** Options of {@link LightFleet}. */
export interface LightFleetOptions {
  vehicles: number;
  fleetId: string;
  brokerUrl: string;
  templates: readonly DeltaTemplate[];
  seed: number;
  publishWindowMs: number;
  ackTimeoutMs: number;
  maxMessageBytes: number;
  /** Updates in flight at once over the whole fleet; 0 for no limit. */
  maxPendingUpdates: number;
  /** Vehicles that connect together. */
  connectBatch: number;
  /** Pause between two batches. */
  connectIntervalMs: number;
  /** Time one vehicle has to connect and publish its status. */
  connectTimeoutMs: number;
  log: Logger;
}

/** Id of light vehicle `index`: `light-00001` and so on. */
export function lightVehicleId(index: number): string {
  return `light-${String(index + 1).padStart(5, '0')}`;
}

/** The light vehicles of one run and their counts. */
export class LightFleet {
  readonly #options: LightFleetOptions;
  readonly #gate: PublishGate;
  readonly #vehicles: LightVehicle[] = [];
  readonly #rounds = new Map<number, LightRoundCounts>();
  readonly #latencies = new Map<number, number[]>();
  #unexpectedAcks = 0;
  #reconnects = 0;
  #connected = 0;

  /** @throws {RangeError} for counts out of range. */
  constructor(options: LightFleetOptions) {
    for (const [name, value, min] of [
      ['vehicles', options.vehicles, 1],
      ['connect batch', options.connectBatch, 1],
      ['connect interval ms', options.connectIntervalMs, 0],
    ] as const) {
      if (!Number.isInteger(value) || value < min) {
        throw new RangeError(
          `${name} ${value} is invalid, expected an integer >= ${min}`,
        );
      }
    }
    this.#options = options;
    this.#gate = new PublishGate(options.maxPendingUpdates);
  }

  /** Vehicles connected so far. */
  get connectedCount(): number {
    return this.#connected;
  }

  /** Maximum number of updates in flight at once. */
  get peakPendingUpdates(): number {
    return this.#gate.peakPending;
  }

  get unexpectedAcks(): number {
    return this.#unexpectedAcks;
  }

  get reconnects(): number {
    return this.#reconnects;
  }

  /**
   * Connects every vehicle, `connectBatch` at a time with
   * `connectIntervalMs` between batches. `onProgress` runs after each
   * batch.
   *
   * @throws {Error} when a vehicle does not connect in time.
   */
  async connect(onProgress: (connected: number) => void): Promise<void> {
    const { vehicles, connectBatch, connectIntervalMs } = this.#options;
    for (let start = 0; start < vehicles; start += connectBatch) {
      const batch: LightVehicle[] = [];
      for (let i = start; i < Math.min(vehicles, start + connectBatch); i++) {
        batch.push(this.#createVehicle(i));
      }
      this.#vehicles.push(...batch);
      await Promise.all(
        batch.map((vehicle) => vehicle.start(this.#options.connectTimeoutMs)),
      );
      this.#connected += batch.length;
      onProgress(this.#connected);
      if (start + connectBatch < vehicles) await delay(connectIntervalMs);
    }
  }

  /** Counts of `round` so far (zeros before any update). */
  countsOf(round: number): LightRoundCounts {
    const counts = this.#countsFor(round);
    const latencies = [...(this.#latencies.get(round) ?? [])].sort(
      (a, b) => a - b,
    );
    return {
      ...counts,
      rejectedByReason: { ...counts.rejectedByReason },
      ackLatencyP50Ms: latencies[Math.floor(latencies.length / 2)] ?? 0,
      ackLatencyMaxMs: latencies.at(-1) ?? 0,
    };
  }

  /** Stops every vehicle, each within a few seconds. */
  async stop(): Promise<void> {
    await Promise.all(this.#vehicles.map((vehicle) => vehicle.stop()));
  }

  #createVehicle(index: number): LightVehicle {
    const options = this.#options;
    const vehicle = new LightVehicle({
      vehicleId: lightVehicleId(index),
      fleetId: options.fleetId,
      brokerUrl: options.brokerUrl,
      templates: options.templates,
      seed: options.seed,
      publishWindowMs: options.publishWindowMs,
      ackTimeoutMs: options.ackTimeoutMs,
      maxMessageBytes: options.maxMessageBytes,
      gate: this.#gate,
      log: options.log,
    });
    vehicle.on('update-sent', ({ round, bytes }) => {
      const counts = this.#countsFor(round);
      counts.sent += 1;
      counts.uplinkBytes += bytes;
    });
    vehicle.on('ack', (event) => this.#onAck(event));
    vehicle.on('ack-timeout', ({ round }) => {
      this.#countsFor(round).ackTimeouts += 1;
    });
    vehicle.on('task-skipped', ({ round }) => {
      this.#countsFor(round).tasksSkipped += 1;
    });
    vehicle.on('unexpected-ack', () => {
      this.#unexpectedAcks += 1;
    });
    vehicle.on('reconnected', () => {
      this.#reconnects += 1;
    });
    return vehicle;
  }

  #onAck(event: LightAckEvent): void {
    const counts = this.#countsFor(event.round);
    if (event.accepted) {
      counts.acksAccepted += 1;
    } else {
      counts.acksRejected += 1;
      const reasons = counts.rejectedByReason;
      reasons[event.reasonCode] = (reasons[event.reasonCode] ?? 0) + 1;
    }
    let latencies = this.#latencies.get(event.round);
    if (latencies === undefined) {
      latencies = [];
      this.#latencies.set(event.round, latencies);
    }
    latencies.push(event.latencyMs);
  }

  #countsFor(round: number): LightRoundCounts {
    let counts = this.#rounds.get(round);
    if (counts === undefined) {
      counts = {
        round,
        sent: 0,
        uplinkBytes: 0,
        acksAccepted: 0,
        acksRejected: 0,
        rejectedByReason: {},
        ackTimeouts: 0,
        tasksSkipped: 0,
        ackLatencyP50Ms: 0,
        ackLatencyMaxMs: 0,
      };
      this.#rounds.set(round, counts);
    }
    return counts;
  }
}
