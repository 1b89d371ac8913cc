/**
 * Signing keys for tests: Ed25519 key pairs written to a temporary folder
 * (private key mode 0600), public key files, and signed payloads.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import {
  encodeModelRelease,
  encodeModelUpdate,
  encodeSignedRelease,
  encodeSignedUpdate,
  formatPublicKeyFile,
  generateSigningKeyPair,
  loadSigningKey,
  type ModelRelease,
  type ModelUpdate,
  type SigningKey,
} from '../protocol/index.ts';

/** A key pair on disk, loaded for signing. */
export interface TestKey {
  keyId: string;
  privateKeyPath: string;
  publicKeyPem: string;
  signer: SigningKey;
}

/** A temporary folder for key files. */
export interface KeyFolder {
  dir: string;
  /** Creates a key pair; the private key file is `<name>.key.pem`. */
  createKey(name: string): TestKey;
  /**
   * Writes a public key file listing `keys` and returns its path; with
   * `vehicleId`, every key is given to that vehicle.
   */
  writePublicKeys(name: string, keys: TestKey[], vehicleId?: string): string;
  remove(): void;
}

export function createKeyFolder(): KeyFolder {
  const dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-keys-'));
  return {
    dir,
    createKey(name) {
      const pair = generateSigningKeyPair();
      const privateKeyPath = path.join(dir, `${name}.key.pem`);
      writeFileSync(privateKeyPath, pair.privateKeyPem, { mode: 0o600 });
      return {
        keyId: pair.keyId,
        privateKeyPath,
        publicKeyPem: pair.publicKeyPem,
        signer: loadSigningKey(privateKeyPath),
      };
    },
    writePublicKeys(name, keys, vehicleId) {
      const file = path.join(dir, name);
      const entries = keys.map((key) => ({
        keyId: key.keyId,
        publicKey: key.publicKeyPem,
        vehicleId,
      }));
      writeFileSync(file, formatPublicKeyFile(entries));
      return file;
    },
    remove: () => rmSync(dir, { recursive: true, force: true }),
  };
}

/** Encodes `release` with `releaseSequence` and signs it with `key`. */
export function signRelease(
  key: TestKey,
  release: ModelRelease,
  releaseSequence: number,
): Uint8Array {
  const manifest = encodeModelRelease({ ...release, releaseSequence });
  return encodeSignedRelease(key.signer.envelope('release', manifest));
}

/** Encodes `update` and signs it with `key`. */
export function signUpdate(key: TestKey, update: ModelUpdate): Uint8Array {
  const bytes = encodeModelUpdate(update);
  return encodeSignedUpdate(key.signer.envelope('update', bytes));
}
