/**
 * Ed25519 signatures on release notices and updates (node:crypto): the
 * private key files, key ids, files of trusted public keys, and signing
 * and verifying with a domain tag per message kind.
 */
import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  sign,
  verify,
  type KeyObject,
} from 'node:crypto';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import path from 'node:path';
import { ErrorCode, FleetError } from './errors.ts';
import type { SignedEnvelope } from './messages.ts';
import { assertPrivateKeyFile } from './tls.ts';

/** Kind of signed message: a release notice or a vehicle's update. */
export type SignedKind = 'release' | 'update';

/**
 * Prefixes of the signed data. A signature over an update can never pass
 * as one over a release notice, even if one key signed both.
 */
const DOMAIN_TAGS: Record<SignedKind, Buffer> = {
  release: Buffer.from('fleetlearn/v1/release\n', 'utf8'),
  update: Buffer.from('fleetlearn/v1/update\n', 'utf8'),
};

/** Hex digits of a key id. */
const KEY_ID_HEX_DIGITS = 16;

function signedData(kind: SignedKind, bytes: Uint8Array): Buffer {
  return Buffer.concat([DOMAIN_TAGS[kind], bytes]);
}

function invalidConfig(message: string, cause?: unknown): FleetError {
  return new FleetError(
    ErrorCode.InvalidConfig,
    message,
    cause === undefined ? undefined : { cause },
  );
}

/**
 * Returns the id of a public key: the first 16 hex digits of the SHA-256
 * of its DER SubjectPublicKeyInfo. A new key always gets a new id.
 */
export function keyIdOf(publicKey: KeyObject): string {
  const der = publicKey.export({ type: 'spki', format: 'der' });
  return createHash('sha256')
    .update(der)
    .digest('hex')
    .slice(0, KEY_ID_HEX_DIGITS);
}

/** A new Ed25519 key pair in PEM form, with its key id. */
export interface GeneratedKeyPair {
  keyId: string;
  /** PKCS#8 PEM; write it with mode 0600. */
  privateKeyPem: string;
  /** SubjectPublicKeyInfo PEM. */
  publicKeyPem: string;
}

/** Generates an Ed25519 key pair. */
export function generateSigningKeyPair(): GeneratedKeyPair {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  return {
    keyId: keyIdOf(publicKey),
    privateKeyPem: String(privateKey.export({ type: 'pkcs8', format: 'pem' })),
    publicKeyPem: String(publicKey.export({ type: 'spki', format: 'pem' })),
  };
}

/**
 * An Ed25519 private key loaded from its file. The key itself stays in a
 * private field and `toJSON` returns only the id and path, so pino or
 * JSON.stringify never print the key.
 */
export class SigningKey {
  readonly keyId: string;
  readonly keyPath: string;
  readonly publicKeyPem: string;
  readonly #privateKey: KeyObject;

  constructor(privateKey: KeyObject, keyPath: string) {
    if (privateKey.asymmetricKeyType !== 'ed25519') {
      throw invalidConfig(
        `signing key file ${keyPath} contains a ` +
          `${privateKey.asymmetricKeyType ?? 'secret'} key, expected Ed25519`,
      );
    }
    const publicKey = createPublicKey(privateKey);
    this.#privateKey = privateKey;
    this.keyPath = keyPath;
    this.keyId = keyIdOf(publicKey);
    this.publicKeyPem = String(
      publicKey.export({ type: 'spki', format: 'pem' }),
    );
  }

  /** Signs the domain tag of `kind` followed by `bytes`. */
  sign(kind: SignedKind, bytes: Uint8Array): Uint8Array {
    return new Uint8Array(
      sign(null, signedData(kind, bytes), this.#privateKey),
    );
  }

  /** Signs `bytes` and returns the envelope that carries them. */
  envelope(kind: SignedKind, bytes: Uint8Array): SignedEnvelope {
    return {
      signedBytes: bytes,
      signature: this.sign(kind, bytes),
      keyId: this.keyId,
    };
  }

  toJSON(): { keyId: string; keyPath: string } {
    return { keyId: this.keyId, keyPath: this.keyPath };
  }
}

/**
 * Loads an Ed25519 private key (PKCS#8 PEM) after checking with
 * {@link assertPrivateKeyFile} that only its owner can read it.
 *
 * @throws {FleetError} INVALID_CONFIG for a missing or unreadable file, a
 *   file its group or others can read, or a key that is not Ed25519.
 */
export function loadSigningKey(keyPath: string): SigningKey {
  assertPrivateKeyFile(keyPath);
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(readFileSync(keyPath));
  } catch (err) {
    throw invalidConfig(
      `signing key file ${keyPath} is not a PEM private key: ` +
        (err as Error).message,
      err,
    );
  }
  return new SigningKey(privateKey, keyPath);
}

/** A public key that signatures are checked with. */
export interface PublicSigningKey {
  keyId: string;
  publicKey: KeyObject;
  /** Vehicle that owns the key; set for update-signing keys only. */
  vehicleId?: string;
}

/** Public keys by key id. */
export type PublicKeySet = ReadonlyMap<string, PublicSigningKey>;

/** One entry of a public key file, as JSON. */
export interface PublicKeyEntry {
  keyId: string;
  /** SubjectPublicKeyInfo PEM. */
  publicKey: string;
  vehicleId?: string;
}

/**
 * Formats a public key file: `{ "keys": [ { keyId, publicKey, vehicleId? } ] }`.
 */
export function formatPublicKeyFile(entries: PublicKeyEntry[]): string {
  return `${JSON.stringify({ keys: entries }, null, 2)}\n`;
}

function parseEntry(file: string, value: unknown): PublicSigningKey {
  const entry = value as Partial<PublicKeyEntry> | null;
  if (
    entry === null ||
    typeof entry !== 'object' ||
    typeof entry.keyId !== 'string' ||
    typeof entry.publicKey !== 'string' ||
    (entry.vehicleId !== undefined && typeof entry.vehicleId !== 'string')
  ) {
    throw invalidConfig(
      `public key file ${file} has an entry that is not ` +
        '{ keyId, publicKey, vehicleId? } with string values',
    );
  }
  let publicKey: KeyObject;
  try {
    publicKey = createPublicKey(entry.publicKey);
  } catch (err) {
    throw invalidConfig(
      `public key file ${file}: key ${entry.keyId} is not a PEM public ` +
        `key: ${(err as Error).message}`,
      err,
    );
  }
  if (publicKey.asymmetricKeyType !== 'ed25519') {
    throw invalidConfig(
      `public key file ${file}: key ${entry.keyId} is ` +
        `${publicKey.asymmetricKeyType}, expected Ed25519`,
    );
  }
  const keyId = keyIdOf(publicKey);
  if (keyId !== entry.keyId) {
    throw invalidConfig(
      `public key file ${file} lists key id ${entry.keyId}, but its key ` +
        `has id ${keyId}`,
    );
  }
  return { keyId, publicKey, vehicleId: entry.vehicleId };
}

function readPublicKeyFile(file: string): PublicSigningKey[] {
  let parsed: { keys?: unknown };
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8')) as { keys?: unknown };
  } catch (err) {
    throw invalidConfig(
      `public key file ${file} cannot be read as JSON: ` +
        (err as Error).message,
      err,
    );
  }
  if (!Array.isArray(parsed?.keys)) {
    throw invalidConfig(`public key file ${file} has no "keys" list`);
  }
  return parsed.keys.map((entry) => parseEntry(file, entry));
}

function addKey(
  keys: Map<string, PublicSigningKey>,
  key: PublicSigningKey,
  file: string,
): void {
  const known = keys.get(key.keyId);
  if (known !== undefined && known.vehicleId !== key.vehicleId) {
    throw invalidConfig(
      `public key ${key.keyId} in ${file} belongs to vehicle ` +
        `${key.vehicleId ?? 'none'}, but another file gives it to ` +
        `${known.vehicleId ?? 'none'}`,
    );
  }
  keys.set(key.keyId, key);
}

/**
 * Reads public keys from one JSON key file, or from every `*.json` file
 * of a directory (one file per vehicle, as provisioning writes them). Each
 * key's id must match the key.
 *
 * @throws {FleetError} INVALID_CONFIG for a missing path, invalid JSON, a
 *   key that is not Ed25519, a wrong key id, or one key id given to two
 *   vehicles.
 */
export function readPublicKeys(keysPath: string): PublicKeySet {
  let isDirectory: boolean;
  try {
    isDirectory = statSync(keysPath).isDirectory();
  } catch (err) {
    throw invalidConfig(
      `public key path ${keysPath} cannot be read: ${(err as Error).message}`,
      err,
    );
  }
  const files = isDirectory
    ? readdirSync(keysPath)
        .filter((name) => name.endsWith('.json'))
        .sort()
        .map((name) => path.join(keysPath, name))
    : [keysPath];
  const keys = new Map<string, PublicSigningKey>();
  for (const file of files) {
    for (const key of readPublicKeyFile(file)) addKey(keys, key, file);
  }
  return keys;
}

/**
 * Checks the signature of `envelope` against `keys` and returns the key
 * that made it.
 *
 * @throws {FleetError} UNKNOWN_KEY when its key id is not in `keys`,
 *   INVALID_SIGNATURE when the signature does not verify.
 */
export function verifyEnvelope(
  kind: SignedKind,
  envelope: SignedEnvelope,
  keys: PublicKeySet,
): PublicSigningKey {
  const key = keys.get(envelope.keyId);
  if (key === undefined) {
    throw new FleetError(
      ErrorCode.UnknownKey,
      `${kind} is signed with key ${envelope.keyId.slice(0, 64)}, which ` +
        `is not among the ${keys.size} keys this receiver trusts`,
    );
  }
  const data = signedData(kind, envelope.signedBytes);
  if (!verify(null, data, key.publicKey, envelope.signature)) {
    throw new FleetError(
      ErrorCode.InvalidSignature,
      `${kind} signature does not verify with key ${key.keyId}; the ` +
        'signed bytes or the signature were changed',
    );
  }
  return key;
}

/** Signing files named in a client configuration, as absolute paths. */
export interface SigningFiles {
  /** Aggregator: private key that signs releases. */
  releaseSigningKeyPath?: string;
  /** Aggregator: file or directory of the vehicles' public keys. */
  vehicleKeysPath?: string;
  /** Vehicle: private key that signs its updates. */
  updateSigningKeyPath?: string;
  /** Vehicle: file of the fleet's trusted release keys. */
  trustedReleaseKeysPath?: string;
}

const SIGNING_FIELDS = [
  'releaseSigningKeyPath',
  'vehicleKeysPath',
  'updateSigningKeyPath',
  'trustedReleaseKeysPath',
] as const;

/**
 * Reads the signing fields of a client configuration written by
 * provisioning (agent.json or aggregator.json). Relative paths are
 * resolved against the file's folder; absent fields stay undefined.
 *
 * @throws {FleetError} INVALID_CONFIG for an unreadable file, invalid
 *   JSON or a field that is not a non-empty string.
 */
export function readSigningConfig(configPath: string): SigningFiles {
  let config: Record<string, unknown>;
  try {
    config = JSON.parse(readFileSync(configPath, 'utf8')) as Record<
      string,
      unknown
    >;
  } catch (err) {
    throw invalidConfig(
      `client configuration ${configPath} cannot be read as JSON: ` +
        (err as Error).message,
      err,
    );
  }
  const folder = path.dirname(path.resolve(configPath));
  const files: SigningFiles = {};
  for (const field of SIGNING_FIELDS) {
    const value = config?.[field];
    if (value === undefined) continue;
    if (typeof value !== 'string' || value.length === 0) {
      throw invalidConfig(
        `client configuration ${configPath} has field "${field}" ` +
          `${JSON.stringify(value)}, expected a non-empty path`,
      );
    }
    files[field] = path.resolve(folder, value);
  }
  return files;
}
