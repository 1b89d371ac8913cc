export {
  DEFAULT_MAX_MESSAGE_BYTES,
  ED25519_SIGNATURE_BYTES,
  decodeModelRelease,
  decodeModelUpdate,
  decodeModelWeights,
  decodeReleaseChunk,
  decodeRoundTask,
  decodeSignedRelease,
  decodeSignedUpdate,
  decodeUpdateAck,
  decodeUpdatePayload,
  decodeVehicleReport,
  decodeVehicleStatus,
  encodeModelRelease,
  encodeModelUpdate,
  encodeModelWeights,
  encodeReleaseChunk,
  encodeRoundTask,
  encodeSignedRelease,
  encodeSignedUpdate,
  encodeUpdateAck,
  encodeVehicleReport,
  encodeVehicleStatus,
  releaseChunkOverheadBytes,
  toSafeInteger,
} from './codec.ts';
export {
  decodePartialAggregate,
  encodePartialAggregate,
} from './partial-codec.ts';
export { ErrorCode, FleetError, isFleetError } from './errors.ts';
export type {
  CandidateRollout,
  CohortRule,
  DepotUpdateEntry,
  LocalMetrics,
  ModelRelease,
  ModelUpdate,
  ModelWeights,
  PartialAggregate,
  ReleaseChunk,
  RoundTask,
  SecureAggregationConfig,
  SignedEnvelope,
  TrainingConfig,
  UpdateAck,
  VehicleReport,
  VehicleStatus,
  VersionReport,
  WireTensor,
} from './messages.ts';
export {
  AckStatus,
  CandidateState,
  TensorEncoding,
  VehicleState,
  VersionRole,
} from './schema.ts';
export {
  COHORT_BUCKETS,
  checkCohortRule,
  cohortBucketOf,
  isInCohort,
  parseTags,
} from './cohort.ts';
export {
  countElements,
  decodeTensorValues,
  encodeFloat32Tensor,
} from './tensor.ts';
export { FleetTopics, assertTopicLevel } from './topics.ts';
export {
  LOG_LEVEL_NAMES,
  createLogger,
  defaultLogLevel,
  errorLogFields,
} from './logger.ts';
export type { Logger } from './logger.ts';
export {
  TLS_BROKER_PROTOCOLS,
  assertCertificateIdentity,
  assertPrivateKeyFile,
  clientIdOf,
  clientIdsOf,
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
export {
  SigningKey,
  formatPublicKeyFile,
  generateSigningKeyPair,
  keyIdOf,
  loadSigningKey,
  readPublicKeys,
  readSigningConfig,
  verifyEnvelope,
} from './signing.ts';
export type {
  GeneratedKeyPair,
  PublicKeyEntry,
  PublicKeySet,
  PublicSigningKey,
  SignedKind,
  SigningFiles,
} from './signing.ts';
