export {
  DERIVED_KEY_BYTES,
  derivePairwiseMaskSeed,
  deriveSelfMaskSeed,
  deriveShareEncryptionKey,
} from './kdf.ts';
export {
  MAX_MASK_WORDS,
  addWordsInPlace,
  expandMask,
  pairwiseMaskSign,
  subtractWordsInPlace,
} from './mask.ts';
export type {
  EncryptedShare,
  KeyAdvertisement,
  MaskedInput,
  RevealedShare,
  UnmaskRequest,
  UnmaskResponse,
} from './messages.ts';
export { createQuantization, dequantizeSum, quantize } from './quantize.ts';
export type { Quantization, RoundingMode } from './quantize.ts';
export { runSecureRound } from './round.ts';
export type {
  SecureRoundOptions,
  SecureRoundResult,
  ServerView,
} from './round.ts';
export { SecAggServer } from './server.ts';
export type { SecAggServerOptions, SecureAggregate } from './server.ts';
export {
  FIELD_ELEMENT_BYTES,
  FIELD_PRIME,
  bytesToFieldElement,
  combineShares,
  fieldElementToBytes,
  splitSecret,
} from './shamir.ts';
export type { ShamirShare } from './shamir.ts';
export { decryptShareBundle, encryptShareBundle } from './share-encryption.ts';
export type { ShareAddress, ShareBundle } from './share-encryption.ts';
export { SecAggVehicle } from './vehicle.ts';
export type { SecAggVehicleOptions } from './vehicle.ts';
export {
  X25519_KEY_BYTES,
  agreeX25519,
  exportX25519PrivateKey,
  generateX25519KeyPair,
  importX25519PrivateKey,
} from './x25519.ts';
export type { X25519KeyPair } from './x25519.ts';
