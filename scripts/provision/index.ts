export {
  REVOCATION_REASONS,
  authorityPaths,
  initAuthority,
  loadAuthority,
  writeCrl,
} from './authority.ts';
export type {
  AuthorityState,
  CertificateRole,
  FleetAuthority,
  InitAuthorityOptions,
  IssuedCertificate,
  RevocationReason,
} from './authority.ts';
export {
  DEFAULT_LEAF_VALIDITY_DAYS,
  issueAggregator,
  issueBroker,
  issueVehicle,
} from './issue.ts';
export type { IssuedFiles } from './issue.ts';
export { revokeCertificates } from './revoke.ts';
export type { RevocationTarget } from './revoke.ts';
export {
  VEHICLE_TRUSTED_KEYS_FILE,
  VEHICLE_UPDATE_KEY_FILE,
  activateReleaseKey,
  initReleaseSigning,
  readReleaseKeyList,
  refreshVehicleTrustedKeys,
  releaseKeyPath,
  removeVehicleKey,
  retireReleaseKey,
  rotateReleaseKey,
  signingPaths,
} from './signing.ts';
export type { ReleaseKeyList } from './signing.ts';
