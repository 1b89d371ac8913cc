/** Events a Depot emits, for tests and embedding programs. */

/** A new round task was taken, after the journal was read back. */
export interface DepotRoundStartedEvent {
  round: number;
  modelVersion: number;
  selected: string[];
  /** Updates of this round merged again from the journal. */
  restoredUpdates: number;
}

/** One update message from a vehicle was judged. */
export interface DepotUpdateDecidedEvent {
  vehicleId: string;
  /** Round named in the update, when it decoded. */
  round?: number;
  updateId?: string;
  /** 'resent' for a copy of an update already merged. */
  accepted: boolean | 'resent';
  /** Reject reason code; undefined unless rejected. */
  code?: string;
}

/** The partial of a round was sealed and first sent. */
export interface DepotPartialForwardedEvent {
  round: number;
  partialId: string;
  vehicles: string[];
  numExamples: number;
  bytes: number;
}

/** The fleet acked the partial of a round, and the vehicles were acked. */
export interface DepotPartialSettledEvent {
  round: number;
  partialId: string;
  /** An AckStatus value. */
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
