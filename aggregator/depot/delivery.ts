/**
 * Delivery of a sealed partial: it is sent until the fleet acks it, and
 * the fleet's ack decides the ack of every update it covers. A vehicle is
 * acked only here, so its outbox keeps an update until the fleet has
 * counted it (or rejected it).
 */
import type { EventEmitter } from 'node:events';
import {
  AckStatus,
  encodePartialAggregate,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import type { DepotRound } from './collector.ts';
import type { DepotEvents } from './events.ts';
import type { PartialForwarder } from './forwarder.ts';
import type { DepotJournal } from './journal.ts';

/** Dependencies of PartialDelivery, supplied by the depot. */
export interface DeliveryOptions {
  forwarder: PartialForwarder;
  journal: DepotJournal;
  maxMessageBytes: number;
  /** Publishes an ack on the vehicle's ack topic; logs its own failures. */
  publishAck: (vehicleId: string, ack: UpdateAck) => void;
  /** The depot's `emit`. */
  emit: EventEmitter<DepotEvents>['emit'];
  /** True while `round` is the depot's current round. */
  isCurrent: (round: DepotRound) => boolean;
  /** Queues a step after the round steps queued before it. */
  serially: (step: () => Promise<void>) => Promise<void>;
  log: Logger;
}

/** Sends partials and settles their rounds. */
export class PartialDelivery {
  readonly #options: DeliveryOptions;
  readonly #log: Logger;

  constructor(options: DeliveryOptions) {
    this.#options = options;
    this.#log = options.log;
  }

  /**
   * Sends the sealed partial of `round` in the background until the fleet
   * acks it, the round's deadline passes or `signal` aborts. The ack then
   * settles the round in the round queue.
   */
  send(round: DepotRound, signal: AbortSignal): void {
    const { partial, partialId } = round.sealed!;
    const fields = {
      round: round.round,
      partialId,
      numExamples: partial.numExamples,
    };
    let bytes: Uint8Array;
    try {
      bytes = encodePartialAggregate(partial, this.#options.maxMessageBytes);
    } catch (err) {
      this.#log.error({ err, ...fields }, 'partial not encodable');
      return;
    }
    const vehicles = partial.updates.map((entry) => entry.vehicleId);
    this.#log.info(
      { ...fields, vehicles, bytes: bytes.length },
      'partial forwarded',
    );
    this.#options.emit('partial-forwarded', {
      ...fields,
      vehicles,
      bytes: bytes.length,
    });
    const outgoing = {
      partialId,
      round: round.round,
      bytes,
      deadlineMs: round.task.deadlineMs,
    };
    this.#options.forwarder.send(outgoing, signal).then(
      (ack) => {
        if (ack === undefined) return;
        void this.#options.serially(() => this.#settle(round, ack));
      },
      (err: unknown) =>
        this.#log.error({ err, ...fields }, 'partial forwarding failed'),
    );
  }

  /** Hands the fleet's ack of a partial to the send waiting for it. */
  receiveFleetAck(ack: UpdateAck): void {
    if (this.#options.forwarder.receiveAck(ack)) return;
    this.#log.debug(
      { partialId: ack.updateId, status: ack.status },
      'ack of a partial no longer awaited',
    );
  }

  /** Acks every merged update of a settled round as the fleet acked it. */
  ackVehicles(round: DepotRound): void {
    for (const { vehicleId, ack } of round.vehicleAcks()) {
      this.#options.publishAck(vehicleId, ack);
    }
  }

  /**
   * Records the fleet's ack in the journal first, then acks the
   * vehicles, so that a restarted depot acks them again if it died
   * in between.
   */
  async #settle(round: DepotRound, fleetAck: UpdateAck): Promise<void> {
    if (!this.#options.isCurrent(round)) return;
    if (round.settle(fleetAck) === undefined) return;
    const fields = {
      round: round.round,
      partialId: fleetAck.updateId,
      vehicles: round.entries.length,
      reasonCode: fleetAck.reasonCode || undefined,
    };
    if (fleetAck.status === AckStatus.Accepted) {
      this.#log.info(fields, 'partial accepted by the fleet');
    } else {
      const reason = fleetAck.reason;
      this.#log.warn({ ...fields, reason }, 'partial rejected by the fleet');
    }
    try {
      await this.#options.journal.recordOutcome(round.round, fleetAck);
    } catch (err) {
      this.#log.error({ err, round: round.round }, 'outcome not journaled');
    }
    this.ackVehicles(round);
    this.#options.emit('partial-settled', {
      round: round.round,
      partialId: fleetAck.updateId,
      status: fleetAck.status,
      reasonCode: fleetAck.reasonCode,
    });
  }
}
