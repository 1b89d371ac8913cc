/**
 * X25519 key pairs with raw 32-byte encodings (RFC 7748), built on
 * node:crypto KeyObjects. Raw keys travel in messages and secret shares;
 * node:crypto imports them through fixed DER prefixes (RFC 8410).
 */
import {
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  generateKeyPairSync,
  type KeyObject,
} from 'node:crypto';
import { protocolViolation } from './errors.ts';

/** Length of a raw X25519 public key, private key and shared secret. */
export const X25519_KEY_BYTES = 32;

// DER headers of a PKCS #8 private key and an SPKI public key for the
// X25519 algorithm identifier 1.3.101.110, followed by the raw key bytes.
const PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

/** A private key object and its raw public key. */
export interface X25519KeyPair {
  privateKey: KeyObject;
  publicKey: Uint8Array;
}

function rawPublicKey(key: KeyObject): Uint8Array {
  const der = key.export({ type: 'spki', format: 'der' });
  return new Uint8Array(der.subarray(der.length - X25519_KEY_BYTES));
}

function checkKeyLength(raw: Uint8Array, keyName: string): void {
  if (!(raw instanceof Uint8Array) || raw.length !== X25519_KEY_BYTES) {
    throw protocolViolation(
      `${keyName} is not ${X25519_KEY_BYTES} bytes of a raw X25519 key`,
    );
  }
}

/** Generates a fresh X25519 key pair. */
export function generateX25519KeyPair(): X25519KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync('x25519');
  return { privateKey, publicKey: rawPublicKey(publicKey) };
}

/** Exports the raw 32-byte private scalar, as stored in PKCS #8. */
export function exportX25519PrivateKey(privateKey: KeyObject): Uint8Array {
  const der = privateKey.export({ type: 'pkcs8', format: 'der' });
  return new Uint8Array(der.subarray(der.length - X25519_KEY_BYTES));
}

/**
 * Imports a raw private scalar and returns the key pair it defines.
 *
 * @throws FleetError MALFORMED_PAYLOAD when the key is not 32 bytes.
 */
export function importX25519PrivateKey(raw: Uint8Array): X25519KeyPair {
  checkKeyLength(raw, 'private key');
  const privateKey = createPrivateKey({
    key: Buffer.concat([PKCS8_PREFIX, raw]),
    format: 'der',
    type: 'pkcs8',
  });
  return { privateKey, publicKey: rawPublicKey(createPublicKey(privateKey)) };
}

/**
 * Computes the X25519 shared secret of a private key and a peer's raw
 * public key.
 *
 * @throws FleetError MALFORMED_PAYLOAD when the public key is not 32 bytes
 *   or OpenSSL rejects it (a low-order point gives an all-zero secret).
 */
export function agreeX25519(
  privateKey: KeyObject,
  peerPublicKey: Uint8Array,
): Uint8Array {
  checkKeyLength(peerPublicKey, 'peer public key');
  const publicKey = createPublicKey({
    key: Buffer.concat([SPKI_PREFIX, peerPublicKey]),
    format: 'der',
    type: 'spki',
  });
  try {
    return new Uint8Array(diffieHellman({ privateKey, publicKey }));
  } catch (err) {
    throw protocolViolation(
      'X25519 key agreement failed for a peer public key',
      err,
    );
  }
}
