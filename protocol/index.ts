export {
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeModelRelease,
  decodeModelUpdate,
  decodeModelWeights,
  decodeRoundTask,
  decodeUpdateAck,
  decodeVehicleStatus,
  encodeModelRelease,
  encodeModelUpdate,
  encodeModelWeights,
  encodeRoundTask,
  encodeUpdateAck,
  encodeVehicleStatus,
  toSafeInteger,
} from './codec.ts';
export { ErrorCode, FleetError, isFleetError } from './errors.ts';
export type {
  LocalMetrics,
  ModelRelease,
  ModelUpdate,
  ModelWeights,
  RoundTask,
  TrainingConfig,
  UpdateAck,
  VehicleStatus,
  WireTensor,
} from './messages.ts';
export { AckStatus, TensorEncoding, VehicleState } from './schema.ts';
export {
  countElements,
  decodeTensorValues,
  encodeFloat32Tensor,
} from './tensor.ts';
export { FleetTopics, assertTopicLevel } from './topics.ts';
export { createLogger } from './logger.ts';
export type { Logger } from './logger.ts';
