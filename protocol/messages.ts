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

export interface UpdateAck {
  updateId: string;
  round: number;
  /** An AckStatus value. */
  status: number;
  reasonCode: string;
  reason: string;
  currentRound: number;
  currentModelVersion: number;
}

export interface ModelRelease {
  modelName: string;
  version: number;
  parentVersion: number;
  round: number;
  sha256: string;
  sizeBytes: number;
  createdAtMs: number;
  onnx: Uint8Array;
  testAccuracy: number;
  numVehicles: number;
  numExamples: number;
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
}

export interface ModelWeights {
  modelName: string;
  version: number;
  tensors: WireTensor[];
}
