/**
 * Encryption of the share bundle one vehicle sends another. The key comes
 * from X25519 on the share key pairs and HKDF with the round and both ids
 * in sender-to-recipient order. The same bytes are the GCM associated
 * data, so a share replayed into another round or routed to another
 * recipient fails authentication.
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { protocolViolation, shareAuthenticationFailed } from './errors.ts';
import { deriveShareEncryptionKey, shareAssociatedData } from './kdf.ts';
import type { EncryptedShare } from './messages.ts';
import {
  FIELD_ELEMENT_BYTES,
  bytesToFieldElement,
  fieldElementToBytes,
} from './shamir.ts';
import { agreeX25519 } from './x25519.ts';
import type { KeyObject } from 'node:crypto';

const NONCE_BYTES = 12;
const AUTH_TAG_BYTES = 16;
const BUNDLE_BYTES = 4 + 2 * FIELD_ELEMENT_BYTES;

/** The two shares a recipient gets of one sender's secrets. */
export interface ShareBundle {
  /** The recipient's evaluation point. */
  x: number;
  /** f(x) for the sender's mask private key s_u^SK. */
  maskKeyShare: bigint;
  /** f(x) for the sender's self-mask secret b_u. */
  selfMaskShare: bigint;
}

function encodeBundle(bundle: ShareBundle): Buffer {
  const bytes = Buffer.alloc(BUNDLE_BYTES);
  bytes.writeUInt32BE(bundle.x, 0);
  bytes.set(fieldElementToBytes(bundle.maskKeyShare, FIELD_ELEMENT_BYTES), 4);
  bytes.set(
    fieldElementToBytes(bundle.selfMaskShare, FIELD_ELEMENT_BYTES),
    4 + FIELD_ELEMENT_BYTES,
  );
  return bytes;
}

function decodeBundle(bytes: Buffer): ShareBundle {
  const end = 4 + FIELD_ELEMENT_BYTES;
  return {
    x: bytes.readUInt32BE(0),
    maskKeyShare: bytesToFieldElement(bytes.subarray(4, end)),
    selfMaskShare: bytesToFieldElement(bytes.subarray(end)),
  };
}

/** Addressing of one share: the round, its sender and its recipient. */
export interface ShareAddress {
  roundId: string;
  senderId: string;
  recipientId: string;
}

/**
 * Encrypts `bundle` from the sender (holding `senderSharePrivateKey`) to
 * the recipient's raw share public key.
 */
export function encryptShareBundle(
  bundle: ShareBundle,
  address: ShareAddress,
  senderSharePrivateKey: KeyObject,
  recipientSharePublicKey: Uint8Array,
): EncryptedShare {
  const { roundId, senderId, recipientId } = address;
  const secret = agreeX25519(senderSharePrivateKey, recipientSharePublicKey);
  const key = deriveShareEncryptionKey(secret, roundId, senderId, recipientId);
  const nonce = randomBytes(NONCE_BYTES);

  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(shareAssociatedData(roundId, senderId, recipientId));
  const ciphertext = Buffer.concat([
    cipher.update(encodeBundle(bundle)),
    cipher.final(),
  ]);
  return {
    roundId,
    senderId,
    recipientId,
    nonce: new Uint8Array(nonce),
    ciphertext: new Uint8Array(ciphertext),
    authTag: new Uint8Array(cipher.getAuthTag()),
  };
}

/**
 * Decrypts a share addressed to the holder of `recipientSharePrivateKey`.
 *
 * @throws FleetError DIGEST_MISMATCH when the tag does not verify (bytes
 *   changed, or round, sender or recipient altered), and MALFORMED_PAYLOAD
 *   when the lengths are wrong.
 */
export function decryptShareBundle(
  share: EncryptedShare,
  recipientSharePrivateKey: KeyObject,
  senderSharePublicKey: Uint8Array,
): ShareBundle {
  const { roundId, senderId, recipientId } = share;
  if (
    share.nonce.length !== NONCE_BYTES ||
    share.authTag.length !== AUTH_TAG_BYTES ||
    share.ciphertext.length !== BUNDLE_BYTES
  ) {
    throw protocolViolation(
      `encrypted share from ${senderId} to ${recipientId} has wrong ` +
        `lengths (nonce ${share.nonce.length}, tag ${share.authTag.length}, ` +
        `ciphertext ${share.ciphertext.length}; expected ${NONCE_BYTES}, ` +
        `${AUTH_TAG_BYTES}, ${BUNDLE_BYTES})`,
    );
  }
  const secret = agreeX25519(recipientSharePrivateKey, senderSharePublicKey);
  const key = deriveShareEncryptionKey(secret, roundId, senderId, recipientId);

  const decipher = createDecipheriv('aes-256-gcm', key, share.nonce, {
    authTagLength: AUTH_TAG_BYTES,
  });
  decipher.setAAD(shareAssociatedData(roundId, senderId, recipientId));
  decipher.setAuthTag(share.authTag);
  let plaintext: Buffer;
  try {
    plaintext = Buffer.concat([
      decipher.update(share.ciphertext),
      decipher.final(),
    ]);
  } catch (err) {
    throw shareAuthenticationFailed(
      `encrypted share from ${senderId} to ${recipientId} in round ` +
        `${roundId} failed AES-GCM authentication`,
      err,
    );
  }
  return decodeBundle(plaintext);
}
