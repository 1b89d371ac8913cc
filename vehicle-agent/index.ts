export { VehicleAgent } from './agent.ts';
export type { VehicleAgentOptions } from './options.ts';
export type {
  AgentCounters,
  AgentEvents,
  ReleaseDeployedEvent,
  ReleaseRejectedEvent,
  TrainingFinishedEvent,
  TrainingStartedEvent,
  UpdateResentEvent,
  UpdateSentEvent,
} from './events.ts';
export { Outbox } from './outbox.ts';
export type { OutboxEntry } from './outbox.ts';
export { ModelDeployment, verifyRelease } from './deployment.ts';
export type { DownloadCounters } from './release-download.ts';
export {
  RELEASE_SEQUENCE_FILE,
  ReleaseVerifier,
  claimedVersionOf,
} from './release-verifier.ts';
export type { ReleaseVerifierOptions } from './release-verifier.ts';
export type { DeployedModel } from './deployment.ts';
export { FeatureCache, hashFrozenPrefix } from './feature-cache.ts';
export { readDeployedModel } from './model-files.ts';
export { classifyImageFile, topClasses } from './classify.ts';
export type { ClassScore, ImageClassification } from './classify.ts';
export {
  ATTACK_KINDS,
  ATTACK_MAX_ABS,
  applyAttack,
  deriveTrainingSeed,
} from './trainer.ts';
export type { UpdateAttack } from './trainer.ts';
