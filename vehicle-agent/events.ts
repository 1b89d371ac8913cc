/** Events and counters a VehicleAgent exposes, for the simulator. */
import type { UpdateAck, VehicleReport } from '../protocol/index.ts';

/** Payload of the 'update-sent' event. */
export interface UpdateSentEvent {
  updateId: string;
  round: number;
  baseModelVersion: number;
  numExamples: number;
  /** Encoded ModelUpdate size. */
  bytes: number;
  trainLoss: number;
  trainAccuracy: number;
}

/** Payload of the 'update-resent' event: an outbox entry sent again. */
export interface UpdateResentEvent {
  updateId: string;
  round: number;
  bytes: number;
}

/** Payload of the 'release-deployed' event. */
export interface ReleaseDeployedEvent {
  version: number;
  sha256: string;
  /** Version served before, undefined for the first deployment. */
  previousVersion: number | undefined;
  durationMs: number;
}

/** Payload of the 'release-rejected' event. */
export interface ReleaseRejectedEvent {
  version: number;
  /** Error code from protocol/errors.ts. */
  code: string;
}

/** Payload of the 'training-started' event. */
export interface TrainingStartedEvent {
  round: number;
  modelVersion: number;
}

/** Payload of the 'training-finished' event. */
export interface TrainingFinishedEvent {
  round: number;
  modelVersion: number;
  durationMs: number;
  /** False when training or publishing failed; the error was logged. */
  succeeded: boolean;
}

/**
 * Payload of the 'secure-input-ready' event: the clipped, weighted vector
 * a secure round masks, in the clear. It stays in the vehicle's process;
 * tests and the simulator compare it with what the aggregator unmasked.
 */
export interface SecureInputReadyEvent {
  round: number;
  /** [w * clip(delta), w]. */
  values: Float32Array;
  /** L2 norm of the deltas before clipping. */
  norm: number;
  clipped: boolean;
  weight: number;
}

/** Event names and listener arguments of VehicleAgent. */
export type AgentEvents = {
  'update-sent': [UpdateSentEvent];
  'secure-input-ready': [SecureInputReadyEvent];
  /** Published again from the outbox after a (re)connection. */
  'update-resent': [UpdateResentEvent];
  /** Emitted once the update's outbox entry is removed. */
  ack: [UpdateAck];
  'release-deployed': [ReleaseDeployedEvent];
  'release-rejected': [ReleaseRejectedEvent];
  'training-started': [TrainingStartedEvent];
  'training-finished': [TrainingFinishedEvent];
  /** An inference report was published on the vehicle's report topic. */
  'report-published': [VehicleReport];
  /** Subscribed and ONLINE status published, after each connection. */
  connected: [];
};

/** Traffic and outcome counters of one agent since it was created. */
export interface AgentCounters {
  /** Round task and release payload bytes received. */
  bytesReceived: number;
  /** Encoded update bytes published. */
  bytesSent: number;
  updatesSent: number;
  /** Outbox entries published again after a (re)connection. */
  updatesResent: number;
  /** Updates in the outbox, awaiting their ack. */
  outboxPending: number;
  acksAccepted: number;
  /** Rejected updates by reason code. */
  acksRejected: Record<string, number>;
  releasesDeployed: number;
  releasesRejected: number;
  /**
   * Rejected releases by reason code, for example INVALID_SIGNATURE or
   * RELEASE_REPLAYED for rejected notices, DIGEST_MISMATCH for bad files.
   */
  releasesRejectedByCode: Record<string, number>;
  /** Payloads that failed to decode, on any subscribed topic. */
  malformedMessages: number;
  /** Rounds whose features came from the cache. */
  featureCacheHits: number;
  /** Rounds that ran the frozen prefix in onnxruntime. */
  featureCacheMisses: number;
}

/** Returns counters with every value zero. */
export function createCounters(): AgentCounters {
  return {
    bytesReceived: 0,
    bytesSent: 0,
    updatesSent: 0,
    updatesResent: 0,
    outboxPending: 0,
    acksAccepted: 0,
    acksRejected: {},
    releasesDeployed: 0,
    releasesRejected: 0,
    releasesRejectedByCode: {},
    malformedMessages: 0,
    featureCacheHits: 0,
    featureCacheMisses: 0,
  };
}
