export { compareVersions, tensorChanges } from './compare.ts';
export type {
  FieldDifference,
  TensorChange,
  VersionComparison,
} from './compare.ts';
export { exportVersion } from './export.ts';
export { describeFileError, oneLine } from './file-errors.ts';
export type { ExportedVersion } from './export.ts';
export { measureLatency, measureReleaseLatency, quantile } from './latency.ts';
export type {
  LatencyImageSource,
  LatencyOptions,
  ReleaseLatency,
} from './latency.ts';
export {
  VERSION_FILE_KINDS,
  modelDirOf,
  versionFileOf,
  versionOfManifestName,
} from './layout.ts';
export type { VersionFileKind } from './layout.ts';
export { parseManifest } from './manifest.ts';
export type { RegistryManifest } from './manifest.ts';
export type { Pin } from './pins.ts';
export { applyPrune, planPrune } from './retention.ts';
export type { KeepReason, PrunePlan, PrunedVersion } from './retention.ts';
export { ModelRegistry, formatVersions } from './store.ts';
export type { DamagedEntry, RegistryEntry, SignatureRecord } from './store.ts';
export { checkOnnx, readOnnx, readWeights } from './version-files.ts';
export type { OnnxCheck } from './version-files.ts';
export { describeStrategy } from './strategy.ts';
export type { StrategyDescription, StrategyOptions } from './strategy.ts';
