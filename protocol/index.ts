export {
  DEFAULT_MAX_MESSAGE_BYTES,
  decodeModelRelease,
  decodeModelUpdate,
  decodeModelWeights,
  decodeReleaseChunk,
  decodeRoundTask,
  decodeUpdateAck,
  decodeVehicleStatus,
  encodeModelRelease,
  encodeModelUpdate,
  encodeModelWeights,
  encodeReleaseChunk,
  encodeRoundTask,
  encodeUpdateAck,
  encodeVehicleStatus,
  releaseChunkOverheadBytes,
  toSafeInteger,
} from './codec.ts';
export { ErrorCode, FleetError, isFleetError } from './errors.ts';
export type {
  LocalMetrics,
  ModelRelease,
  ModelUpdate,
  ModelWeights,
  ReleaseChunk,
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
export {
  TLS_BROKER_PROTOCOLS,
  assertCertificateIdentity,
  assertPrivateKeyFile,
  clientIdOf,
  formatIdentityUri,
  identitiesOfCertificate,
  isTlsBrokerUrl,
  loadClientTls,
  parseIdentityUri,
  readClientConfig,
  toMqttSecurityOptions,
} from './tls.ts';
export type {
  BrokerClientSecurity,
  ClientTlsFiles,
  ClientTlsMaterial,
  FleetClientConfig,
  FleetIdentity,
  FleetRole,
} from './tls.ts';
