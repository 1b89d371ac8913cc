/**
 * Replies the depot sends a vehicle on its own: the ack of an update it
 * rejected, and the ack of a copy of an update the fleet has settled.
 */
import type { EventEmitter } from 'node:events';
import type { Logger, UpdateAck } from '../../protocol/index.ts';
import { truncateText } from '../messages.ts';
import type { RejectedUpdate } from '../validate.ts';
import { vehicleAckOf } from './acks.ts';
import type { DepotRound } from './collector.ts';
import type { CountedUpdates } from './counted-updates.ts';
import type { DepotEvents } from './events.ts';

/** Dependencies of UpdateReplies, supplied by the depot. */
export interface UpdateRepliesOptions {
  counted: CountedUpdates;
  /** Publishes an ack on the vehicle's ack topic and logs its own failures. */
  publishAck: (vehicleId: string, ack: UpdateAck) => void;
  emit: EventEmitter<DepotEvents>['emit'];
  log: Logger;
}

/** Sends the depot's own acks to vehicles, and logs and reports them. */
export class UpdateReplies {
  readonly #options: UpdateRepliesOptions;

  constructor(options: UpdateRepliesOptions) {
    this.#options = options;
  }

  /**
   * Acks a rejected update with `ack`, or with DUPLICATE_UPDATE when the
   * fleet has counted that update already. A vehicle resends its outbox
   * after it reconnects, possibly after the round closed.
   */
  reject(
    vehicleId: string,
    decision: RejectedUpdate,
    ack: UpdateAck,
    current: { round: number; modelVersion: number },
  ): void {
    const { counted, publishAck, log, emit } = this.#options;
    const update = decision.update;
    const fields = {
      vehicleId,
      round: update?.round,
      updateId: update?.updateId,
    };

    const duplicate = counted.duplicateAck(vehicleId, decision, current);
    if (duplicate !== undefined) {
      publishAck(vehicleId, duplicate);
      log.info(
        fields,
        'copy of an update the fleet counted, acked DUPLICATE_UPDATE',
      );
      emit('update-decided', {
        ...fields,
        accepted: false,
        code: duplicate.reasonCode,
      });
      return;
    }

    publishAck(vehicleId, ack);
    log.warn(
      {
        ...fields,
        code: decision.code,
        reason: truncateText(decision.reason),
      },
      'update rejected',
    );
    emit('update-decided', { ...fields, accepted: false, code: decision.code });
  }

  /** Acks a copy of a merged update again once the fleet has acked it. */
  resent(round: DepotRound, vehicleId: string, updateId: string): void {
    const entry = round.entries.find((item) => item.updateId === updateId);
    const outcome = round.outcome;
    if (outcome !== undefined && entry !== undefined) {
      this.#options.publishAck(
        vehicleId,
        vehicleAckOf(entry, round.round, outcome),
      );
    }
    this.#options.log.debug(
      {
        vehicleId,
        updateId,
        round: round.round,
        isSettled: outcome !== undefined,
      },
      'copy of a merged update',
    );
    this.#options.emit('update-decided', {
      vehicleId,
      round: round.round,
      updateId,
      accepted: 'resent',
    });
  }
}
