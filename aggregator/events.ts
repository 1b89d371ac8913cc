import type { RoundStats } from './round.ts';

/** Payload of 'round-opened'. */
export interface RoundOpenedEvent {
  round: number;
  /** Version the round trains from. */
  modelVersion: number;
  /** Selected vehicle ids, sorted. */
  selected: string[];
  /** Epoch milliseconds after which the round closes. */
  deadlineMs: number;
}

/** Payload of 'round-closed': the round produced `modelVersion`. */
export interface RoundClosedEvent extends RoundStats {
  modelVersion: number;
  /** Test accuracy of the new version; undefined without a test set. */
  accuracy: number | undefined;
  /** Bytes of the encoded ModelRelease message. */
  releaseBytes: number;
  /** Maximum ONNX-vs-TF.js probability difference on the probe batch. */
  exportMaxAbsDiff: number;
  /** Epsilon spent after this round at the DP delta; undefined without DP. */
  epsilon: number | undefined;
  /** DP-FedAvg details of the round; undefined without DP. */
  privacy: RoundPrivacy | undefined;
  /** Outcome of the norm bound; undefined without the normBound option. */
  normBound: RoundNormBound | undefined;
}

/**
 * Outcome of the norm bound in a closed round. Its updates were acked as
 * accepted on arrival, so `accepted` in the stats counts them too.
 */
export interface RoundNormBound {
  action: 'clip' | 'reject';
  /** Median L2 norm of the round's updates; undefined without updates. */
  medianNorm: number | undefined;
  /** L2 norm bound applied; undefined without updates. */
  bound: number | undefined;
  /** Updates left out of the aggregate for a norm above the bound. */
  rejected: number;
  /** Updates scaled down to the bound. */
  clipped: number;
  /** Vehicles whose update was left out, sorted. */
  rejectedVehicleIds: string[];
  /** Vehicles whose update was clipped, sorted. */
  clippedVehicleIds: string[];
}

/** DP-FedAvg details of a closed round. */
export interface RoundPrivacy {
  /** Epsilon spent after this round, at the configured delta. */
  epsilon: number;
  /** q = selected / online vehicles when the round opened. */
  samplingRate: number;
  /**
   * Accepted updates whose norm was above clipNorm. Undefined in secure
   * rounds, where vehicles clip and the aggregator receives no single norm.
   */
  clippedUpdates: number | undefined;
  /** Median L2 norm of the accepted updates before clipping; likewise. */
  medianUpdateNorm: number | undefined;
}

/** Payload of 'secure-phase': a phase of a secure round began. */
export interface SecurePhaseEvent {
  round: number;
  phase: 'advertise' | 'share' | 'mask' | 'unmask';
  /** Vehicles the phase waits for, sorted. */
  expected: string[];
}

/** Payload of 'round-failed': the model stays at `modelVersion`. */
export interface RoundFailedEvent extends RoundStats {
  modelVersion: number;
  /** An ErrorCode, for example QUORUM_NOT_MET or EXPORT_MISMATCH. */
  reasonCode: string;
  message: string;
}

/** Payload of 'update-decided', one per received update message. */
export interface UpdateDecidedEvent {
  vehicleId: string;
  /** Round named in the update; undefined when it did not decode. */
  round: number | undefined;
  updateId: string | undefined;
  accepted: boolean;
  /** ErrorCode of a rejection; undefined when accepted. */
  reasonCode: string | undefined;
  bytes: number;
  /** numExamples the update claims; undefined when it did not decode. */
  numExamples?: number;
  /** The vehicle's training loss (LocalMetrics); set when accepted. */
  trainLoss?: number;
}

/** Payload of 'release-published'. */
export interface ReleasePublishedEvent {
  modelVersion: number;
  round: number;
  sha256: string;
  /** Bytes of the encoded ModelRelease message. */
  bytes: number;
}

/**
 * Payload of 'version-held': with stagedReleases, a round stored
 * `modelVersion` without publishing it fleet-wide.
 */
export interface VersionHeldEvent {
  modelVersion: number;
  round: number;
  /** Version the fleet-wide release names; undefined before a notice. */
  fleetVersion: number | undefined;
}

/** Events of the Aggregator, for the simulator and tests. */
export interface AggregatorEvents {
  'round-opened': [RoundOpenedEvent];
  'round-closed': [RoundClosedEvent];
  'round-failed': [RoundFailedEvent];
  'update-decided': [UpdateDecidedEvent];
  'release-published': [ReleasePublishedEvent];
  'secure-phase': [SecurePhaseEvent];
}

/**
 * Events of the Aggregator with stagedReleases. Apart from
 * AggregatorEvents, whose every event the live view must handle.
 */
export interface StagedReleaseEvents {
  'version-held': [VersionHeldEvent];
}
