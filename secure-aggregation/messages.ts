/**
 * Messages of one secure aggregation round, as plain objects. Every message
 * passes through the server, which routes encrypted shares but cannot read
 * them. Nothing here is signed yet, so the server could substitute keys.
 *
 * Vehicle sets use the notation of Bonawitz et al. (CCS 2017): U1 are the
 * vehicles that advertised keys, U2 those of U1 that shared keys, and U3
 * those of U2 that sent a masked input (the survivors).
 */
import type { ShamirShare } from './shamir.ts';

/** Phase 0, vehicle to server, then broadcast: the vehicle's public keys. */
export interface KeyAdvertisement {
  roundId: string;
  vehicleId: string;
  /** Raw X25519 key for the pairwise mask agreement (s_u^PK). */
  maskPublicKey: Uint8Array;
  /** Raw X25519 key for encrypting shares to this vehicle (c_u^PK). */
  sharePublicKey: Uint8Array;
}

/**
 * Phase 1, vehicle to server to recipient: the sender's shares of its mask
 * private key and self-mask secret for one recipient, under AES-256-GCM.
 */
export interface EncryptedShare {
  roundId: string;
  senderId: string;
  recipientId: string;
  /** 12-byte random GCM nonce. */
  nonce: Uint8Array;
  ciphertext: Uint8Array;
  /** 16-byte GCM authentication tag. */
  authTag: Uint8Array;
}

/** Phase 2, vehicle to server: the quantized update plus all masks. */
export interface MaskedInput {
  roundId: string;
  vehicleId: string;
  maskedWords: Uint32Array;
}

/**
 * Phase 3, server to each surviving vehicle: which vehicles sent a masked
 * input (survivors) and which shared keys but did not (dropped). Together
 * they are exactly the vehicles that completed phase 1.
 */
export interface UnmaskRequest {
  roundId: string;
  survivorIds: string[];
  droppedIds: string[];
}

/** One share a vehicle reveals, with the vehicle whose secret it is. */
export interface RevealedShare {
  ownerId: string;
  share: ShamirShare;
}

/**
 * Phase 3, vehicle to server: shares of each survivor's self-mask secret
 * and of each dropped vehicle's mask private key, never both for one
 * vehicle.
 */
export interface UnmaskResponse {
  roundId: string;
  vehicleId: string;
  selfMaskShares: RevealedShare[];
  maskKeyShares: RevealedShare[];
}
