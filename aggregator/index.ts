export { Aggregator } from './aggregator.ts';
export type {
  AggregatorEvents,
  ReleasePublishedEvent,
  RoundClosedEvent,
  RoundFailedEvent,
  SecurePhaseEvent,
  RoundOpenedEvent,
  RoundNormBound,
  RoundPrivacy,
  UpdateDecidedEvent,
  StagedReleaseEvents,
  VersionHeldEvent,
} from './events.ts';
export {
  HOLD_FILE,
  STARTUP_NOTICE_WAIT_MS,
  StagedRelease,
} from './staged-release.ts';
export {
  ClippedSum,
  PrivacyAccountant,
  differentialPrivacyOfFlags,
  samplingRateOf,
} from './privacy-round.ts';
export type {
  DifferentialPrivacyOptions,
  DpFlags,
  ResolvedDifferentialPrivacy,
} from './privacy-round.ts';
export type { SecureAggregationOptions } from './secure-options.ts';
export type { AsyncBufferOptions } from './async-options.ts';
export {
  NORM_BOUND_ACTIONS,
  normBoundOfFlags,
  resolveNormBound,
} from './round-norm-bound.ts';
export type { NormBoundFlags } from './round-norm-bound.ts';
export {
  SERVER_OPTIMIZER_DEFAULTS,
  SERVER_OPTIMIZER_FILE,
  ServerStep,
  resolveServerOptimizer,
  serverOptimizerOfFlags,
} from './server-step.ts';
export type {
  ProposedServerStep,
  ServerOptimizerFlags,
  ServerOptimizerOptions,
} from './server-step.ts';
export { SERVER_OPTIMIZER_NAMES } from './strategies/index.ts';
export type {
  NormBoundOptions,
  ServerOptimizerConfig,
  ServerOptimizerName,
} from './strategies/index.ts';
export { FedAvgAccumulator, applyDeltas } from './fedavg.ts';
export { parseLiveViewPort, startLiveView } from './live-view/index.ts';
export type {
  FleetSnapshot,
  LiveView,
  LiveViewSource,
} from './live-view/index.ts';
export { ModelStore } from './model-store.ts';
export type { ModelManifest, StoredModel } from './model-store.ts';
export { AGGREGATION_RULES, resolveOptions } from './options.ts';
export type {
  AggregationRule,
  AggregatorOptions,
  ResolvedOptions,
  TestSet,
} from './options.ts';
export type { RoundStats } from './round.ts';
export { ReleaseSigner } from './release-signer.ts';
export type { SignedNotice } from './release-signer.ts';
export { selectVehicles } from './selection.ts';
export { loadState, saveState } from './state.ts';
export type { AggregatorState } from './state.ts';
export { validateUpdate } from './validate.ts';
export type { RoundContext, UpdateDecision } from './validate.ts';
