/** Bookkeeping of UpdateAck messages on the vehicle. */
import {
  AckStatus,
  ErrorCode,
  type Logger,
  type UpdateAck,
} from '../protocol/index.ts';
import type { AgentCounters } from './events.ts';
import type { SentUpdate } from './round-runner.ts';

/** Reject reasons that mean the vehicle trained from an outdated task. */
export const BEHIND_CODES: readonly string[] = [
  ErrorCode.WrongModelVersion,
  ErrorCode.WrongRound,
  ErrorCode.RoundClosed,
];

/**
 * Counts and logs one ack: accepted at info, rejected at warn with its
 * reason code. Returns true when the rejection means the vehicle is
 * behind the aggregator and should resynchronise.
 */
export function recordAck(
  ack: UpdateAck,
  sent: SentUpdate | undefined,
  stats: AgentCounters,
  log: Logger,
): boolean {
  const fields = {
    updateId: ack.updateId,
    round: ack.round,
    known: sent !== undefined,
  };
  if (ack.status === AckStatus.Accepted) {
    stats.acksAccepted += 1;
    log.info(fields, 'update accepted');
    return false;
  }

  const reasonCode = ack.reasonCode || 'UNSPECIFIED';
  stats.acksRejected[reasonCode] = (stats.acksRejected[reasonCode] ?? 0) + 1;
  log.warn({ ...fields, reasonCode, reason: ack.reason }, 'update rejected');
  return BEHIND_CODES.includes(reasonCode);
}
