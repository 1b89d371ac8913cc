/**
 * Partials that a previous run of the depot sent and whose fleet ack it
 * never received. A depot that dies after sending its partial finds the
 * fleet's ack queued in its persistent session when it starts again,
 * often before the round task arrives, and possibly after the round
 * closed. These partials are read from the journal before the depot
 * subscribes, so that such an ack still reaches their vehicles.
 */
import type { EventEmitter } from 'node:events';
import {
  AckStatus,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import { truncateText } from '../messages.ts';
import { duplicateAckOf, duplicateEntriesOf, vehicleAckOf } from './acks.ts';
import type { CountedUpdates } from './counted-updates.ts';
import type { DepotEvents } from './events.ts';
import type { DepotJournal, UnsettledPartial } from './journal.ts';

/** Dependencies of EarlierPartials, supplied by the depot. */
export interface EarlierPartialsOptions {
  journal: DepotJournal;
  counted: CountedUpdates;
  /** Publishes an ack on the vehicle's ack topic and logs its own failures. */
  publishAck: (vehicleId: string, ack: UpdateAck) => void;
  emit: EventEmitter<DepotEvents>['emit'];
  log: Logger;
}

/** Unsettled partials of a previous run, by partial id. */
export class EarlierPartials {
  readonly #options: EarlierPartialsOptions;
  readonly #partials = new Map<string, UnsettledPartial>();

  constructor(options: EarlierPartialsOptions) {
    this.#options = options;
  }

  /** Adds `partials` to those awaiting their fleet ack. */
  add(partials: readonly UnsettledPartial[]): void {
    for (const partial of partials) {
      this.#partials.set(partial.partialId, partial);
      this.#options.log.info(
        {
          round: partial.round,
          partialId: partial.partialId,
          vehicles: partial.entries.length,
        },
        'partial of an earlier run awaits the fleet ack',
      );
    }
  }

  /** Returns true when `partialId` is one of these partials. */
  has(partialId: string): boolean {
    return this.#partials.has(partialId);
  }

  /**
   * Stops waiting for `partialId`, because its round was restored as the
   * current one and the depot sends it again itself.
   */
  forget(partialId: string): void {
    this.#partials.delete(partialId);
  }

  /**
   * Acks the vehicles of the partial that `fleetAck` is for, records the
   * outcome in the journal when it still contains the round, and returns
   * true. Returns false when the ack is for none of these partials.
   *
   * A rejection that lists entries the fleet counted otherwise acks only
   * those. The other entries stay in the journal, so that the depot sends
   * them again without the counted ones if their round task arrives.
   */
  async settle(fleetAck: UpdateAck): Promise<boolean> {
    const partial = this.#partials.get(fleetAck.updateId);
    if (partial === undefined) return false;
    const { journal, counted, publishAck, log } = this.#options;
    const { round, partialId, entries } = partial;
    this.#partials.delete(partialId);

    const duplicates = duplicateEntriesOf(entries, fleetAck);
    if (duplicates.length > 0 && duplicates.length < entries.length) {
      const ids = duplicates.map((entry) => entry.updateId);
      log.warn(
        { round, partialId, duplicates: ids },
        'partial of an earlier run had entries counted already',
      );
      counted.add(round, ids);
      for (const entry of duplicates) {
        publishAck(entry.vehicleId, duplicateAckOf(entry, round, fleetAck));
      }
      try {
        for (const id of ids) await journal.removeUpdate(round, id);
      } catch (err) {
        log.error(
          { err, round, partialId, duplicates: ids },
          'removing counted updates from the journal failed',
        );
      }
      return true;
    }

    const isAccepted = fleetAck.status === AckStatus.Accepted;
    const fields = { round, partialId, vehicles: entries.length };
    if (isAccepted) {
      log.info(fields, 'partial of an earlier run accepted by the fleet');
      counted.add(
        round,
        entries.map((entry) => entry.updateId),
      );
    } else {
      log.warn(
        {
          ...fields,
          code: fleetAck.reasonCode,
          reason: truncateText(fleetAck.reason),
        },
        'partial of an earlier run rejected by the fleet',
      );
    }
    try {
      if ((await journal.rounds()).includes(round)) {
        await journal.recordOutcome(round, fleetAck);
      }
    } catch (err) {
      log.error(
        { err, round, partialId },
        'journaling the fleet ack failed, vehicles are acked anyway',
      );
    }
    for (const entry of entries) {
      publishAck(entry.vehicleId, vehicleAckOf(entry, round, fleetAck));
    }
    this.#options.emit('partial-settled', {
      round,
      partialId,
      status: fleetAck.status,
      reasonCode: fleetAck.reasonCode,
    });
    return true;
  }
}
