/**
 * The vehicle's side of secure aggregation rounds over MQTT. For a round
 * task with a secure configuration the agent publishes no ModelUpdate;
 * this participant instead advertises the round's keys as soon as the task
 * arrives, shares its secrets once the key list comes, masks the trained
 * update once both training and the routed shares are there, and responds to
 * the unmask request. See secure-aggregation/README.md.
 *
 * Messages are not stored in the outbox: a vehicle that misses a phase
 * counts as dropped, which the protocol survives.
 */
import type { EventEmitter } from 'node:events';
import {
  errorLogFields,
  type Logger,
  type RoundTask,
  type SecureAggregationConfig,
} from '../protocol/index.ts';
import type { EncryptedShare } from '../secure-aggregation/messages.ts';
import { quantize } from '../secure-aggregation/quantize.ts';
import {
  buildSecureVector,
  quantizationOf,
} from '../secure-aggregation/update-vector.ts';
import { SecAggVehicle } from '../secure-aggregation/vehicle.ts';
import {
  decodeToVehicle,
  encodeFromVehicle,
  secureRoundId,
  type FromVehicleBody,
  type ToVehicleMessage,
} from '../secure-aggregation/wire.ts';
import type { AgentEvents } from './events.ts';

export interface SecureParticipantOptions {
  vehicleId: string;
  fleetId: string;
  maxMessageBytes: number;
  log: Logger;
  /** Publishes to this vehicle's secure topic with QoS 1. */
  publish: (bytes: Uint8Array) => Promise<void>;
  events: EventEmitter<AgentEvents>;
}

/** The one secure round the vehicle takes part in. */
interface ActiveRound {
  round: number;
  openedAtMs: number;
  config: SecureAggregationConfig;
  machine: SecAggVehicle;
  routedShares?: EncryptedShare[];
  /** Quantized [w * clip(delta), w], once training finished. */
  input?: Uint32Array;
  masked: boolean;
}

export class SecureParticipant {
  readonly #options: SecureParticipantOptions;
  #active: ActiveRound | undefined;

  constructor(options: SecureParticipantOptions) {
    this.#options = options;
  }

  /** Round of the secure round in progress, if any. */
  get activeRound(): number | undefined {
    return this.#active?.round;
  }

  /**
   * Joins the secure round of `task` and advertises its keys. A newer
   * round replaces the one in progress, whose secrets are dropped.
   */
  begin(task: RoundTask): void {
    const config = task.secureAggregation;
    if (config === undefined || config === null) return;
    const { vehicleId, fleetId } = this.#options;
    const machine = new SecAggVehicle({
      vehicleId,
      roundId: secureRoundId(fleetId, task.round, task.openedAtMs),
      threshold: config.threshold,
    });
    const active: ActiveRound = {
      round: task.round,
      openedAtMs: task.openedAtMs,
      config,
      machine,
      masked: false,
    };
    this.#active = active;
    this.#options.log.info(
      { round: task.round, threshold: config.threshold },
      'secure round joined',
    );
    this.#step(active, 'advertise keys', () => ({
      kind: 'keys',
      advertisement: machine.advertiseKeys(),
    }));
  }

  /**
   * Hands over the trained deltas of `task`'s round. They are clipped,
   * weighted and quantized now, and masked once the routed shares arrive.
   * Returns false when the round is no longer the active one.
   */
  submit(
    task: RoundTask,
    deltas: ReadonlyMap<string, Float32Array>,
    numExamples: number,
  ): boolean {
    const active = this.#active;
    if (active?.round !== task.round || active.openedAtMs !== task.openedAtMs) {
      this.#options.log.warn(
        { round: task.round, activeRound: active?.round },
        'trained update for a secure round no longer active, dropped',
      );
      return false;
    }
    const vector = buildSecureVector(deltas, numExamples, active.config);
    active.input = quantize(vector.values, quantizationOf(active.config));
    this.#options.log.info(
      {
        round: task.round,
        norm: vector.norm,
        clipped: vector.clipped,
        weight: vector.weight,
      },
      'secure input ready',
    );
    this.#options.events.emit('secure-input-ready', {
      round: task.round,
      values: vector.values,
      norm: vector.norm,
      clipped: vector.clipped,
      weight: vector.weight,
    });
    this.#maybeMask(active);
    return true;
  }

  /** Handles a message from this vehicle's secure inbox. */
  handle(payload: Uint8Array): void {
    const { log, fleetId } = this.#options;
    let message: ToVehicleMessage;
    try {
      message = decodeToVehicle(payload, fleetId);
    } catch (err) {
      log.warn(
        { ...errorLogFields(err), bytes: payload.length },
        'secure message rejected',
      );
      return;
    }
    const active = this.#active;
    if (
      active === undefined ||
      active.round !== message.round ||
      active.openedAtMs !== message.roundOpenedAtMs
    ) {
      log.info(
        { round: message.round, activeRound: active?.round },
        'secure message for another round ignored',
      );
      return;
    }
    const { body } = message;
    switch (body.kind) {
      case 'key-list':
        this.#step(active, 'share keys', () => ({
          kind: 'shares',
          shares: active.machine.shareKeys(body.advertisements),
        }));
        break;
      case 'routed-shares':
        active.routedShares = body.shares;
        this.#maybeMask(active);
        break;
      case 'unmask-request':
        this.#step(active, 'unmask', () => ({
          kind: 'unmask-response',
          response: active.machine.unmask(body.request),
        }));
        break;
    }
  }

  /** Drops the round in progress, for example at stop. */
  clear(): void {
    this.#active = undefined;
  }

  #maybeMask(active: ActiveRound): void {
    const { input, routedShares } = active;
    if (input === undefined || routedShares === undefined || active.masked) {
      return;
    }
    active.masked = true;
    this.#step(active, 'mask input', () => ({
      kind: 'masked-input',
      input: active.machine.maskInput(routedShares, input),
    }));
  }

  /**
   * Runs one protocol step and publishes its message. A failed step
   * aborts this vehicle's part in the round (the state machine rejects
   * every later step), which the others survive as a dropout.
   */
  #step(active: ActiveRound, step: string, run: () => FromVehicleBody): void {
    const { log, vehicleId } = this.#options;
    const fields = { round: active.round, step };
    let bytes: Uint8Array;
    try {
      bytes = encodeFromVehicle(
        {
          round: active.round,
          roundOpenedAtMs: active.openedAtMs,
          vehicleId,
          body: run(),
        },
        this.#options.maxMessageBytes,
      );
    } catch (err) {
      log.warn(
        { ...fields, ...errorLogFields(err) },
        'secure round step failed',
      );
      return;
    }
    this.#options.publish(bytes).then(
      () => log.debug({ ...fields, bytes: bytes.length }, 'secure step sent'),
      (err: unknown) => log.warn({ ...fields, err }, 'secure step not sent'),
    );
  }
}
