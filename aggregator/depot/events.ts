/** Events a Depot emits, for tests and embedding programs. */

/**
 * Payload of 'round-started': a new round task, after the journal was read
 * back.
 */
export interface DepotRoundStartedEvent {
  round: number;
  modelVersion: number;
  selected: string[];
  /** Updates of this round merged again from the journal. */
  restoredUpdates: number;
}

/**
 * Payload of 'update-decided': the decision on one update message from a
 * vehicle.
 */
export interface DepotUpdateDecidedEvent {
  vehicleId: string;
  /** Round named in the update, when it decoded. */
  round?: number;
  updateId?: string;
  /** Decision, with 'resent' for a copy of an update already merged. */
  accepted: boolean | 'resent';
  /** Rejection code, set only for a rejected update. */
  code?: string;
}

/**
 * Payload of 'partial-forwarded': a round's partial, sealed and sent for the
 * first time.
 */
export interface DepotPartialForwardedEvent {
  round: number;
  partialId: string;
  vehicles: string[];
  numExamples: number;
  bytes: number;
}

/**
 * Payload of 'partial-settled': the fleet's ack of a round's partial, sent on
 * to the vehicles.
 */
export interface DepotPartialSettledEvent {
  round: number;
  partialId: string;
  /** Fleet's ack status, an AckStatus value. */
  status: number;
  reasonCode: string;
}

/** Event map of Depot. */
export interface DepotEvents {
  'round-started': [DepotRoundStartedEvent];
  'update-decided': [DepotUpdateDecidedEvent];
  'partial-forwarded': [DepotPartialForwardedEvent];
  'partial-settled': [DepotPartialSettledEvent];
  /**
   * The depot stopped by itself on this error, for example because
   * another running depot aggregator uses its depot id.
   */
  failed: [Error];
}
