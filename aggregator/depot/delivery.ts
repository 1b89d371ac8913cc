/**
 * Delivery of a sealed partial: it is sent until the fleet acks it, and
 * the fleet's ack decides the ack of every update it covers. A merged
 * update is acked only here or, for a partial of an earlier run, in
 * unsettled.ts, so the vehicle's outbox keeps it until the fleet has
 * counted it (or rejected it).
 */
import type { EventEmitter } from 'node:events';
import {
  AckStatus,
  ErrorCode,
  encodePartialAggregate,
  isFleetError,
  type DepotUpdateEntry,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import { truncateText } from '../messages.ts';
import { duplicateAckOf, duplicateEntriesOf } from './acks.ts';
import type { DepotRound } from './collector.ts';
import type { CountedUpdates } from './counted-updates.ts';
import type { DepotEvents } from './events.ts';
import type { PartialForwarder } from './forwarder.ts';
import { mergeJournaled, type DepotJournal } from './journal.ts';
import type { EarlierPartials } from './unsettled.ts';

/** Dependencies of PartialDelivery, supplied by the depot. */
export interface DeliveryOptions {
  forwarder: PartialForwarder;
  journal: DepotJournal;
  maxMessageBytes: number;
  /** Publishes an ack on the vehicle's ack topic and logs its own failures. */
  publishAck: (vehicleId: string, ack: UpdateAck) => void;
  /** The depot's `emit`. */
  emit: EventEmitter<DepotEvents>['emit'];
  /** Returns true while `round` is the depot's current round. */
  isCurrent: (round: DepotRound) => boolean;
  /** Makes `next` the current round in place of `round`. */
  replaceRound: (round: DepotRound, next: DepotRound) => void;
  /** Queues a step after the round steps queued before it. */
  serially: (step: () => Promise<void>) => Promise<void>;
  /** Update ids the fleet counted, filled here from its acks. */
  counted: CountedUpdates;
  /** Partials of an earlier run that await their fleet ack. */
  earlier: EarlierPartials;
  log: Logger;
}

/** Sends partials and settles their rounds. */
export class PartialDelivery {
  readonly #options: DeliveryOptions;
  readonly #log: Logger;
  /**
   * Partial ids whose vehicles this run acked, so that a round restored
   * from the journal later does not ack them twice.
   */
  readonly #ackedPartialIds = new Set<string>();

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
      this.#log.error(
        { err, ...fields, maxMessageBytes: this.#options.maxMessageBytes },
        'encoding the partial failed, its vehicles get the rejection',
      );
      // Settled like a fleet rejection, so that every vehicle gets an ack
      // with the reason instead of waiting for one that never comes.
      const rejection: UpdateAck = {
        updateId: partialId,
        round: round.round,
        status: AckStatus.Rejected,
        reasonCode: isFleetError(err) ? err.code : ErrorCode.PayloadTooLarge,
        reason: truncateText((err as Error).message),
        currentRound: round.round,
        currentModelVersion: round.task.modelVersion,
      };
      void this.#options.serially(() => this.#decide(round, rejection, signal));
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
        void this.#options.serially(() => this.#decide(round, ack, signal));
      },
      (err: unknown) =>
        this.#log.error({ err, ...fields }, 'partial forwarding failed'),
    );
  }

  /**
   * Hands the fleet's ack of a partial to the send waiting for it, or to
   * the partial of an earlier run that it is for.
   */
  receiveFleetAck(ack: UpdateAck): void {
    if (this.#options.forwarder.receiveAck(ack)) return;
    const earlier = this.#options.earlier;
    if (earlier.has(ack.updateId)) {
      void this.#options.serially(async () => {
        if (await earlier.settle(ack)) this.#ackedPartialIds.add(ack.updateId);
      });
      return;
    }
    this.#log.debug(
      { partialId: ack.updateId, status: ack.status },
      'ack of a partial no longer awaited',
    );
  }

  /**
   * Acks every merged update of a settled round as the fleet acked it,
   * unless this run acked them already.
   */
  ackVehicles(round: DepotRound): void {
    const { sealed, outcome } = round;
    if (sealed === undefined || outcome === undefined) return;
    if (this.#ackedPartialIds.has(sealed.partialId)) return;
    this.#ackedPartialIds.add(sealed.partialId);
    if (outcome.status === AckStatus.Accepted) {
      this.#options.counted.add(
        round.round,
        round.entries.map((entry) => entry.updateId),
      );
    } else {
      const duplicates = duplicateEntriesOf(round.entries, outcome);
      this.#options.counted.add(
        round.round,
        duplicates.map((entry) => entry.updateId),
      );
    }
    for (const { vehicleId, ack } of round.vehicleAcks()) {
      this.#options.publishAck(vehicleId, ack);
    }
  }

  /**
   * Settles `round` with the fleet's ack, or, when the fleet had counted
   * only some of its entries already, sends the others again.
   */
  async #decide(
    round: DepotRound,
    fleetAck: UpdateAck,
    signal: AbortSignal,
  ): Promise<void> {
    if (!this.#options.isCurrent(round)) return;
    if (fleetAck.updateId !== round.sealed?.partialId) return;
    const duplicates = duplicateEntriesOf(round.entries, fleetAck);
    if (duplicates.length > 0 && duplicates.length < round.entries.length) {
      await this.#sendWithout(round, fleetAck, duplicates, signal);
      return;
    }
    await this.#settle(round, fleetAck);
  }

  /**
   * Records the fleet's ack in the journal first, then acks the
   * vehicles, so that a restarted depot acks them again if it died
   * in between.
   */
  async #settle(round: DepotRound, fleetAck: UpdateAck): Promise<void> {
    if (round.settle(fleetAck) === undefined) return;
    const fields = {
      round: round.round,
      partialId: fleetAck.updateId,
      vehicles: round.entries.length,
    };
    if (fleetAck.status === AckStatus.Accepted) {
      this.#log.info(fields, 'partial accepted by the fleet');
    } else {
      this.#log.warn(
        {
          ...fields,
          code: fleetAck.reasonCode,
          reason: truncateText(fleetAck.reason),
        },
        'partial rejected by the fleet',
      );
    }
    try {
      await this.#options.journal.recordOutcome(round.round, fleetAck);
    } catch (err) {
      this.#log.error(
        { err, round: round.round, partialId: fleetAck.updateId },
        'journaling the fleet ack failed, vehicles are acked anyway',
      );
    }
    this.ackVehicles(round);
    this.#options.emit('partial-settled', {
      round: round.round,
      partialId: fleetAck.updateId,
      status: fleetAck.status,
      reasonCode: fleetAck.reasonCode,
    });
  }

  /**
   * Acks `duplicates` DUPLICATE_UPDATE, because the fleet counted them
   * another way (for example sent to the fleet broker directly), and
   * sends the other entries in a new partial, rebuilt from the journal.
   * After the round's deadline, or once the fleet moved to a later round,
   * the other entries are acked ROUND_CLOSED instead.
   */
  async #sendWithout(
    round: DepotRound,
    fleetAck: UpdateAck,
    duplicates: DepotUpdateEntry[],
    signal: AbortSignal,
  ): Promise<void> {
    const { journal, publishAck, counted } = this.#options;
    const duplicateIds = duplicates.map((entry) => entry.updateId);
    const keep = new Set(
      round.entries
        .map((entry) => entry.updateId)
        .filter((id) => !duplicateIds.includes(id)),
    );
    const previousPartialId = fleetAck.updateId;
    this.#log.warn(
      { round: round.round, partialId: previousPartialId, duplicateIds },
      'partial had entries the fleet counted already',
    );
    counted.add(round.round, duplicateIds);
    try {
      for (const id of duplicateIds) {
        await journal.removeUpdate(round.round, id);
      }
    } catch (err) {
      this.#log.error(
        { err, round: round.round, duplicateIds },
        'removing counted updates from the journal failed',
      );
    }
    for (const entry of duplicates) {
      publishAck(entry.vehicleId, duplicateAckOf(entry, round.round, fleetAck));
    }

    const next = round.emptyCopy();
    const merged = await mergeJournaled(next, keep, journal, this.#log);
    if (merged < keep.size) {
      this.#log.error(
        { round: round.round, expected: keep.size, merged },
        'journal is missing updates of the partial, they are not resent',
      );
    }
    if (merged === 0) return;
    const sealed = next.seal(Date.now());
    this.#options.replaceRound(round, next);
    try {
      await journal.recordForwarded(next.round, {
        partialId: sealed.partialId,
        updateIds: sealed.partial.updates.map((entry) => entry.updateId),
      });
    } catch (err) {
      this.#log.error(
        { err, round: next.round, partialId: sealed.partialId },
        'journaling the resealed partial failed',
      );
    }

    const isOpen =
      Date.now() < next.task.deadlineMs && fleetAck.currentRound <= next.round;
    this.#log.info(
      {
        round: next.round,
        partialId: sealed.partialId,
        previousPartialId,
        vehicles: merged,
        isOpen,
      },
      isOpen
        ? 'partial sent again without the counted entries'
        : 'round closed, other entries of the partial not sent again',
    );
    if (isOpen) {
      this.send(next, signal);
      return;
    }
    await this.#settle(next, {
      updateId: sealed.partialId,
      round: next.round,
      status: AckStatus.Rejected,
      reasonCode: ErrorCode.RoundClosed,
      reason:
        `round ${next.round} closed before depot ${sealed.partial.depotId} ` +
        'could send its updates again without those the fleet had counted',
      currentRound: fleetAck.currentRound,
      currentModelVersion: fleetAck.currentModelVersion,
    });
  }
}
