export { PrivacyBudget } from './budget.ts';
export type { PrivacyBudgetOptions, PrivacyBudgetState } from './budget.ts';
export { clipUpdate, computeUpdateNorm } from './clipping.ts';
export type { ClippedUpdate } from './clipping.ts';
export { logAddExp, logErfc, logSubExp } from './log-math.ts';
export {
  addGaussianNoise,
  computeMeanNoiseStdDev,
  computeNoisyMean,
  createGaussianSource,
} from './noise.ts';
export type {
  DpNoiseOptions,
  GaussianSourceOptions,
  NormalSource,
} from './noise.ts';
export {
  checkMechanism,
  checkOrders,
  computeRdp,
  DEFAULT_RDP_ORDERS,
  MAX_RDP_ORDER,
} from './rdp.ts';
export { convertRdpToEpsilon } from './rdp-conversion.ts';
export type { PrivacySpent, RdpConversion } from './rdp-conversion.ts';
