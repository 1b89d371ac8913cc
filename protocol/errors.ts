/**
 * Stable error codes shared by every fleetlearn process. Reject reasons on
 * the ack topic use these strings, and tests assert the code, not the
 * wording of the message.
 */
export const ErrorCode = {
  /** Bytes that protobufjs cannot decode, or a message missing a field. */
  MalformedPayload: 'MALFORMED_PAYLOAD',
  /** Encoded message larger than the configured maximum. */
  PayloadTooLarge: 'PAYLOAD_TOO_LARGE',
  /** Update for another model name or base version than the round's. */
  WrongModelVersion: 'WRONG_MODEL_VERSION',
  /** Update for a round that is not open. */
  WrongRound: 'WRONG_ROUND',
  /** Update from a vehicle not selected for the round. */
  VehicleNotSelected: 'VEHICLE_NOT_SELECTED',
  /** Tensor names differ from the round's trainable tensors. */
  WrongTensors: 'WRONG_TENSORS',
  /** Tensor shape differs from the model's. */
  WrongShape: 'WRONG_SHAPE',
  /** Tensor encoding not supported by the receiver. */
  UnsupportedEncoding: 'UNSUPPORTED_ENCODING',
  /** NaN or infinite value in a tensor. */
  NonFiniteValue: 'NON_FINITE_VALUE',
  /** Finite tensor value whose magnitude is above the configured bound. */
  ValueOutOfRange: 'VALUE_OUT_OF_RANGE',
  /** numExamples is zero, above the configured maximum or not safe. */
  InvalidExampleCount: 'INVALID_EXAMPLE_COUNT',
  /** An update with this update id, or from this vehicle, was counted. */
  DuplicateUpdate: 'DUPLICATE_UPDATE',
  /** The round closed before the update arrived. */
  RoundClosed: 'ROUND_CLOSED',
  /** Release digest does not match its bytes. */
  DigestMismatch: 'DIGEST_MISMATCH',
  /** Exported ONNX output differs from the training framework's. */
  ExportMismatch: 'EXPORT_MISMATCH',
  /** Round ended with fewer accepted updates than its quorum. */
  QuorumNotMet: 'QUORUM_NOT_MET',
  /** Weighted mean over zero examples. */
  EmptyAggregate: 'EMPTY_AGGREGATE',
  /** Data directory missing, empty or in an unknown layout. */
  DataNotFound: 'DATA_NOT_FOUND',
  /** Image file that cannot be decoded. */
  InvalidImage: 'INVALID_IMAGE',
  /** Option or configuration value that cannot work. */
  InvalidConfig: 'INVALID_CONFIG',
  /** Model file or weights that do not match the architecture. */
  InvalidModel: 'INVALID_MODEL',
  /** Round abandoned because the fleet rolled back to an older model. */
  RolledBack: 'ROLLED_BACK',
  /** Release or update without a signature where one is required. */
  NotSigned: 'NOT_SIGNED',
  /** Signature made with a key the receiver does not trust or know. */
  UnknownKey: 'UNKNOWN_KEY',
  /** Signature that does not verify over the signed bytes. */
  InvalidSignature: 'INVALID_SIGNATURE',
  /**
   * Update signed with the key of another vehicle than the one it names,
   * or than the one whose topic it arrived on.
   */
  SignerMismatch: 'SIGNER_MISMATCH',
  /**
   * Signed release whose sequence number is below the highest one the
   * vehicle accepted: an older notice replayed.
   */
  ReleaseReplayed: 'RELEASE_REPLAYED',
  /** Too few updates for a robust rule, such as Krum's n > 2f + 2. */
  RobustRuleUnsatisfied: 'ROBUST_RULE_UNSATISFIED',
  /** Update whose L2 norm is above the round's norm bound. */
  UpdateNormTooLarge: 'UPDATE_NORM_TOO_LARGE',
  /**
   * Plain ModelUpdate in a round that uses secure aggregation, where only
   * masked inputs are accepted.
   */
  SecureAggregationRequired: 'SECURE_AGGREGATION_REQUIRED',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** The one error class for domain failures; `code` is stable. */
export class FleetError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'FleetError';
    this.code = code;
  }
}

/** Returns true when `err` is a FleetError, optionally with `code`. */
export function isFleetError(
  err: unknown,
  code?: ErrorCode,
): err is FleetError {
  return err instanceof FleetError && (code === undefined || err.code === code);
}
