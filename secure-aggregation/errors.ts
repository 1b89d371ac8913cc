import { ErrorCode, FleetError } from '../protocol/index.ts';

// NOTE: the protocol has no dedicated error codes yet. Share authentication
// failures use DIGEST_MISMATCH and protocol violations (a message out of
// phase, an unmask request that names a vehicle twice) use
// MALFORMED_PAYLOAD, so a caller cannot tell them from codec failures by
// code alone. SHARE_AUTH_FAILED and SECAGG_PROTOCOL_VIOLATION would fix that.

/**
 * Creates the error for a message in the wrong phase, from the wrong
 * sender or with inconsistent contents.
 */
export function protocolViolation(
  message: string,
  cause?: unknown,
): FleetError {
  return new FleetError(
    ErrorCode.MalformedPayload,
    message,
    cause === undefined ? undefined : { cause },
  );
}

/** Creates the error for an encrypted share whose AES-GCM tag fails. */
export function shareAuthenticationFailed(
  message: string,
  cause: unknown,
): FleetError {
  return new FleetError(ErrorCode.DigestMismatch, message, { cause });
}

/** Creates the error for fewer vehicles than the threshold in a phase. */
export function quorumNotMet(
  roundId: string,
  phase: string,
  count: number,
  threshold: number,
): FleetError {
  return new FleetError(
    ErrorCode.QuorumNotMet,
    `secure aggregation round ${roundId}: ${count} vehicles in phase ` +
      `${phase}, but the threshold is ${threshold}; the round cannot finish`,
  );
}
