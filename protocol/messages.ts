/** Decoded fleetlearn.v1 messages, as the codecs return them. */

export interface WireTensor {
  name: string;
  shape: number[];
  /** A TensorEncoding value. */
  encoding: number;
  data: Uint8Array;
  scale: number;
  indices: number[];
}

export interface TrainingConfig {
  localEpochs: number;
  batchSize: number;
  learningRate: number;
  /** FedProx proximal coefficient; 0 disables it. */
  proximalMu: number;
  trainableTensors: string[];
  /** Softmax over the vehicle's own classes only; see trainLocal. */
  restrictToLocalClasses: boolean;
}

export interface RoundTask {
  fleetId: string;
  round: number;
  modelName: string;
  modelVersion: number;
  selectedVehicles: string[];
  training: TrainingConfig;
  openedAtMs: number;
  deadlineMs: number;
  minUpdates: number;
  modelSha256: string;
  /** Set for a secure aggregation round; null or absent otherwise. */
  secureAggregation?: SecureAggregationConfig | null;
}

/** Secure aggregation parameters of a round (secure_aggregation_v1.proto). */
export interface SecureAggregationConfig {
  threshold: number;
  clipNorm: number;
  /** 0 means equal weights. */
  exampleCap: number;
  maxVehicles: number;
  tensorNames: string[];
}

export interface LocalMetrics {
  trainLoss: number;
  trainAccuracy: number;
  trainDurationMs: number;
  backend: string;
}

export interface ModelUpdate {
  updateId: string;
  vehicleId: string;
  modelName: string;
  baseModelVersion: number;
  round: number;
  /** FedAvg weight: number of local examples trained on. */
  numExamples: number;
  deltas: WireTensor[];
  metrics: LocalMetrics;
  createdAtMs: number;
}

/** One vehicle update merged into a depot's partial. */
export interface DepotUpdateEntry {
  vehicleId: string;
  updateId: string;
  numExamples: number;
}

/** A depot aggregator's merged updates of one round. */
export interface PartialAggregate {
  partialId: string;
  depotId: string;
  modelName: string;
  baseModelVersion: number;
  round: number;
  /** One entry per vehicle, sorted by vehicle id. */
  updates: DepotUpdateEntry[];
  /** Sum of the entries' numExamples: the FedAvg weight of the partial. */
  numExamples: number;
  /** Example-weighted mean of the merged deltas, float32 tensors. */
  meanDeltas: WireTensor[];
  createdAtMs: number;
}

export interface UpdateAck {
  updateId: string;
  round: number;
  /** An AckStatus value. */
  status: number;
  reasonCode: string;
  reason: string;
  currentRound: number;
  currentModelVersion: number;
  /**
   * Only in the reply to a depot partial rejected with DUPLICATE_UPDATE:
   * the entries' update ids the round had counted already.
   */
  duplicateUpdateIds?: string[];
}

/** Release notice: the ONNX file's identity and how it is chunked. */
export interface ModelRelease {
  modelName: string;
  version: number;
  parentVersion: number;
  round: number;
  /** Hex SHA-256 of the whole ONNX file. */
  sha256: string;
  sizeBytes: number;
  createdAtMs: number;
  testAccuracy: number;
  numVehicles: number;
  numExamples: number;
  /** Data bytes of every chunk except the last. */
  chunkSizeBytes: number;
  chunkCount: number;
  /** Hex SHA-256 of each chunk's data, by chunk index. */
  chunkSha256: string[];
  /**
   * Publication counter of signed notices, growing with every publication
   * (rollbacks too); 0 or absent in unsigned notices. Decoded notices
   * always carry it.
   */
  releaseSequence?: number;
  /**
   * Set only in notices on the candidate topic (staged rollout); null or
   * absent on the fleet-wide release topic.
   */
  candidate?: CandidateRollout | null;
}

/** Vehicles of a rollout stage; see CohortRule in the .proto file. */
export interface CohortRule {
  /** Share of the vehicles matching `tags`, in 1/10,000 (0 to 10,000). */
  basisPoints: number;
  hashSalt: string;
  vehicleIds: string[];
  /** Tags a vehicle must all have. */
  tags: Record<string, string>;
}

/** A staged rollout's instruction to one cohort. */
export interface CandidateRollout {
  rolloutId: string;
  /** A CandidateState value. */
  state: number;
  stage: number;
  cohort: CohortRule;
  /** Run beside the model in service and report agreement only. */
  shadow: boolean;
  stableVersion: number;
}

/** Inference figures of one model version on one vehicle. */
export interface VersionReport {
  version: number;
  sha256: string;
  /** A VersionRole value. */
  role: number;
  inferenceCount: number;
  errorCount: number;
  latencyP50Ms: number;
  latencyP95Ms: number;
  meanConfidence: number;
  labelledCount: number;
  correctCount: number;
  comparedCount: number;
  agreedCount: number;
}

/** A vehicle's inference report, per model version it runs. */
export interface VehicleReport {
  vehicleId: string;
  createdAtMs: number;
  modelName: string;
  tags: Record<string, string>;
  versions: VersionReport[];
  rolloutId: string;
}

/**
 * A signed message as it travels: the encoded inner message (a
 * ModelRelease or a ModelUpdate), its Ed25519 signature and the id of the
 * key that made it.
 */
export interface SignedEnvelope {
  /** The encoded inner message, exactly as signed. */
  signedBytes: Uint8Array;
  signature: Uint8Array;
  keyId: string;
}

/** One part of a released ONNX file. */
export interface ReleaseChunk {
  modelName: string;
  version: number;
  index: number;
  data: Uint8Array;
}

export interface VehicleStatus {
  vehicleId: string;
  /** A VehicleState value. */
  state: number;
  modelName: string;
  modelVersion: number;
  numExamples: number;
  updatedAtMs: number;
  backend: string;
  /**
   * Start of the MQTT connection attempt this status belongs to, in epoch
   * ms; 0 when unknown.
   */
  connectionId: number;
}

export interface ModelWeights {
  modelName: string;
  version: number;
  tensors: WireTensor[];
}
