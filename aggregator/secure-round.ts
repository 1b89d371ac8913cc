/**
 * One secure aggregation round over MQTT, on the aggregator: it drives the
 * SecAggServer state machine through its four phases, routes messages to
 * and from the vehicles, and ends with the sum of the survivors' vectors
 * [sum(w * delta), sum(w)]. It never receives one vehicle's update in the
 * clear.
 *
 * Each phase ends early once every expected vehicle responded, otherwise at
 * its deadline: key advertisement and key sharing after `phaseTimeoutMs`,
 * masked input at the round deadline, unmasking `phaseTimeoutMs` later.
 * A vehicle that stays silent past a deadline is a dropout, which the
 * protocol survives while at least `threshold` vehicles remain.
 */
import { setTimeout as delay } from 'node:timers/promises';
import {
  errorLogFields,
  type Logger,
  type SecureAggregationConfig,
} from '../protocol/index.ts';
import { SecAggServer } from '../secure-aggregation/server.ts';
import { dequantizeSum } from '../secure-aggregation/quantize.ts';
import {
  quantizationOf,
  vectorLengthOf,
} from '../secure-aggregation/update-vector.ts';
import {
  decodeFromVehicle,
  encodeToVehicle,
  secureRoundId,
  type FromVehicleMessage,
  type ToVehicleBody,
} from '../secure-aggregation/wire.ts';

/** The parts of the aggregator process that the session uses. */
export interface SecureRoundHost {
  readonly log: Logger;
  readonly fleetId: string;
  readonly maxMessageBytes: number;
  /** Publishes to the vehicle's secure inbox with QoS 1; logs failures. */
  publishToVehicle(vehicleId: string, bytes: Uint8Array): void;
}

/** The session's phases, in order, for events and logs. */
export type SecurePhase = 'advertise' | 'share' | 'mask' | 'unmask';

export interface SecureRoundOptions {
  round: number;
  openedAtMs: number;
  selected: readonly string[];
  config: SecureAggregationConfig;
  /** Element count of each tensor in config.tensorNames, in that order. */
  tensorSizes: readonly number[];
  /** Epoch ms at which the masked input phase ends. */
  maskDeadlineMs: number;
  phaseTimeoutMs: number;
  signal: AbortSignal;
  /** Called when a phase begins, with the vehicles it waits for. */
  onPhase?: (phase: SecurePhase, expected: readonly string[]) => void;
}

/** The unmasked result of a secure round. */
export interface SecureOutcome {
  /** [sum(w * delta), sum(w)] over the survivors, in float64. */
  sum: Float64Array;
  survivorIds: string[];
  droppedIds: string[];
  /** Bytes of every secure message received from vehicles. */
  uplinkBytes: number;
}

/** Drives one round; `run()` resolves with the sum or rejects. */
export class SecureRoundSession {
  readonly roundId: string;
  readonly #host: SecureRoundHost;
  readonly #options: SecureRoundOptions;
  readonly #server: SecAggServer;
  #phase: SecurePhase = 'advertise';
  /** Vehicles the current phase waits for, and those that responded. */
  #expected = new Set<string>();
  readonly #responded = new Set<string>();
  #wake: (() => void) | undefined;
  #uplinkBytes = 0;

  constructor(host: SecureRoundHost, options: SecureRoundOptions) {
    this.#host = host;
    this.#options = options;
    this.roundId = secureRoundId(
      host.fleetId,
      options.round,
      options.openedAtMs,
    );
    this.#server = new SecAggServer({
      roundId: this.roundId,
      threshold: options.config.threshold,
      vectorLength: vectorLengthOf(options.tensorSizes),
      vehicleIds: options.selected,
    });
  }

  get phase(): SecurePhase {
    return this.#phase;
  }

  /**
   * Runs the four phases.
   *
   * @throws {FleetError} QUORUM_NOT_MET when a phase ends with fewer than
   *   threshold vehicles, MALFORMED_PAYLOAD when unmasking finds a wrong
   *   share; an AbortError when the signal aborts.
   */
  async run(): Promise<SecureOutcome> {
    const { phaseTimeoutMs, selected, maskDeadlineMs } = this.#options;
    this.#beginPhase('advertise', selected);
    await this.#waitForAnswers(phaseTimeoutMs);
    const advertisements = this.#server.closeAdvertising();
    const keyHolders = advertisements.map((a) => a.vehicleId);

    this.#beginPhase('share', keyHolders);
    this.#sendToEach(keyHolders, () => ({ kind: 'key-list', advertisements }));
    await this.#waitForAnswers(phaseTimeoutMs);
    const routed = this.#server.closeSharing();

    this.#beginPhase('mask', [...routed.keys()]);
    this.#sendToEach([...routed.keys()], (id) => ({
      kind: 'routed-shares',
      shares: routed.get(id)!,
    }));
    await this.#waitForAnswers(Math.max(0, maskDeadlineMs - Date.now()));
    const request = this.#server.closeMaskedInput();

    this.#beginPhase('unmask', request.survivorIds);
    this.#sendToEach(request.survivorIds, () => ({
      kind: 'unmask-request',
      request,
    }));
    await this.#waitForAnswers(phaseTimeoutMs);
    const aggregate = this.#server.finish();
    const quantization = quantizationOf(this.#options.config);
    const sum = dequantizeSum(
      aggregate.sumWords,
      quantization,
      aggregate.survivorIds.length,
    );
    return {
      sum,
      survivorIds: aggregate.survivorIds,
      droppedIds: aggregate.droppedIds,
      uplinkBytes: this.#uplinkBytes,
    };
  }

  /**
   * Hands over a message from the secure topic of `topicVehicleId`. A bad
   * or untimely message is logged and dropped; the round goes on.
   */
  receive(topicVehicleId: string, payload: Uint8Array): void {
    const { log, fleetId } = this.#host;
    const fields = { round: this.#options.round, vehicleId: topicVehicleId };
    let message: FromVehicleMessage;
    try {
      message = decodeFromVehicle(payload, fleetId);
      if (message.vehicleId !== topicVehicleId) {
        log.warn(
          { ...fields, claimedVehicleId: message.vehicleId },
          'secure message names another vehicle than its topic, dropped',
        );
        return;
      }
      if (
        message.round !== this.#options.round ||
        message.roundOpenedAtMs !== this.#options.openedAtMs
      ) {
        log.info(
          { ...fields, messageRound: message.round },
          'secure message for another round dropped',
        );
        return;
      }
      this.#uplinkBytes += payload.length;
      this.#apply(message);
    } catch (err) {
      log.warn(
        { ...fields, ...errorLogFields(err), phase: this.#phase },
        'secure message rejected',
      );
      return;
    }
    if (this.#expected.has(topicVehicleId)) {
      this.#responded.add(topicVehicleId);
      if (this.#responded.size >= this.#expected.size) this.#wake?.();
    }
  }

  #apply(message: FromVehicleMessage): void {
    const { body } = message;
    switch (body.kind) {
      case 'keys':
        this.#server.receiveAdvertisement(body.advertisement);
        break;
      case 'shares':
        this.#server.receiveShares(message.vehicleId, body.shares);
        break;
      case 'masked-input':
        this.#server.receiveMaskedInput(body.input);
        break;
      case 'unmask-response':
        this.#server.receiveUnmaskResponse(body.response);
        break;
    }
  }

  /**
   * Starts `phase`, which waits for `expected`. It begins before the
   * phase's messages go out, so that no response arrives before it.
   */
  #beginPhase(phase: SecurePhase, expected: readonly string[]): void {
    this.#phase = phase;
    this.#expected = new Set(expected);
    this.#responded.clear();
    this.#options.onPhase?.(phase, expected);
    this.#host.log.info(
      { round: this.#options.round, phase, expected: expected.length },
      'secure round phase started',
    );
  }

  /**
   * Waits until every expected vehicle responded, `timeoutMs` passed, or
   * the signal aborted (which throws).
   */
  async #waitForAnswers(timeoutMs: number): Promise<void> {
    const { signal, round } = this.#options;
    if (this.#responded.size < this.#expected.size) {
      const responded = new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
      // The timer ends with the phase, or with the signal.
      const phaseEnded = new AbortController();
      const onAbort = (): void => phaseEnded.abort();
      signal.addEventListener('abort', onAbort, { once: true });
      const timedOut = delay(timeoutMs, undefined, {
        signal: phaseEnded.signal,
      }).catch(() => undefined);
      await Promise.race([responded, timedOut]);
      phaseEnded.abort();
      signal.removeEventListener('abort', onAbort);
      this.#wake = undefined;
    }
    signal.throwIfAborted();
    const missing = [...this.#expected].filter(
      (id) => !this.#responded.has(id),
    );
    this.#host.log.info(
      { round, phase: this.#phase, responded: this.#responded.size, missing },
      'secure round phase ended',
    );
  }

  #sendToEach(
    vehicleIds: readonly string[],
    bodyOf: (vehicleId: string) => ToVehicleBody,
  ): void {
    const { round, openedAtMs } = this.#options;
    for (const vehicleId of vehicleIds) {
      const bytes = encodeToVehicle(
        { round, roundOpenedAtMs: openedAtMs, body: bodyOf(vehicleId) },
        this.#host.maxMessageBytes,
      );
      this.#host.publishToVehicle(vehicleId, bytes);
    }
  }
}
