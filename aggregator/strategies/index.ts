export { aggregateMedian, aggregateTrimmedMean } from './coordinate-rules.ts';
export type {
  MedianOptions,
  TrimOptions,
  TrimmedMeanResult,
} from './coordinate-rules.ts';
export { aggregateKrum, aggregateMultiKrum } from './krum.ts';
export type {
  KrumOptions,
  KrumResult,
  KrumScore,
  MultiKrumOptions,
} from './krum.ts';
export { applyNormBound, clipToNorm, computeUpdateNorm } from './norm-bound.ts';
export type {
  ClipResult,
  NormBoundOptions,
  NormBoundResult,
  NormDecision,
} from './norm-bound.ts';
export {
  SERVER_OPTIMIZER_NAMES,
  SERVER_OPTIMIZER_STATE_FORMAT,
  createServerOptimizerState,
  parseServerOptimizerState,
} from './server-optimizer-state.ts';
export type {
  ServerOptimizerName,
  ServerOptimizerState,
  TensorMoments,
} from './server-optimizer-state.ts';
export { applyServerOptimizer } from './server-optimizers.ts';
export type {
  FedAdagradConfig,
  FedAdamConfig,
  FedAvgMConfig,
  ServerOptimizerConfig,
  ServerStepResult,
} from './server-optimizers.ts';
export { checkUpdates } from './vehicle-update.ts';
export type { CheckedUpdates, VehicleUpdate } from './vehicle-update.ts';
