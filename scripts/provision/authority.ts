/**
 * The fleet certificate authority on disk: its key and certificate, the
 * record of issued certificates, and the CRL it signs.
 */
import { webcrypto } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import {
  ErrorCode,
  FleetError,
  assertPrivateKeyFile,
  assertTopicLevel,
  type FleetRole,
} from '../../protocol/index.ts';
import { writePrivateKey, writePublicFile } from './files.ts';
import { KEY_ALGORITHM, SIGNING_ALGORITHM, x509 } from './x509.ts';

/** Role of an issued certificate: a client role or the broker. */
export type CertificateRole = FleetRole | 'broker';

/** One certificate the CA issued. */
export interface IssuedCertificate {
  /** Lower-case hex. */
  serial: string;
  role: CertificateRole;
  /** Vehicle id for a vehicle, else the role. */
  name: string;
  issuedAt: string;
  notAfter: string;
  revokedAt?: string;
  revocationReason?: RevocationReason;
}

/** CRL reasons `revoke` accepts (RFC 5280 CRLReason names). */
export const REVOCATION_REASONS = [
  'unspecified',
  'keyCompromise',
  'superseded',
  'cessationOfOperation',
] as const;
export type RevocationReason = (typeof REVOCATION_REASONS)[number];

/** ca/state.json: the fleet, CRL settings and every issued certificate. */
export interface AuthorityState {
  version: 1;
  fleetId: string;
  /** Days from a CRL's issue to its nextUpdate. */
  crlDays: number;
  /** Number of the last CRL written (the CRL Number extension). */
  crlNumber: number;
  certificates: IssuedCertificate[];
}

/** A loaded CA, ready to sign. */
export interface FleetAuthority {
  dir: string;
  state: AuthorityState;
  certificate: x509.X509Certificate;
  privateKey: CryptoKey;
}

/** Paths inside a provisioning folder. */
export function authorityPaths(dir: string) {
  const ca = path.join(dir, 'ca');
  return {
    folder: ca,
    certificate: path.join(ca, 'ca.cert.pem'),
    privateKey: path.join(ca, 'ca.key.pem'),
    crl: path.join(ca, 'crl.pem'),
    state: path.join(ca, 'state.json'),
  };
}

/** Normalizes a hex serial number: lower case, no leading zeros. */
export function normalizeSerialHex(hex: string): string {
  return hex.toLowerCase().replace(/^0+(?=.)/, '');
}

/** Returns a random positive 16-byte serial number as lower-case hex. */
export function randomSerial(): string {
  const bytes = webcrypto.getRandomValues(new Uint8Array(16));
  // DER integers are signed and minimal: the first byte must be 0x01-0x7f.
  bytes[0] = (bytes[0] % 0x7f) + 1;
  return Buffer.from(bytes).toString('hex');
}

/** Encodes a PKCS#8 private key as PEM. */
export async function exportPrivateKeyPem(key: CryptoKey): Promise<string> {
  const der = await webcrypto.subtle.exportKey('pkcs8', key);
  return x509.PemConverter.encode(der, 'PRIVATE KEY');
}

/** Generates an ECDSA P-256 key pair whose private key can be exported. */
export function generateKeyPair(): Promise<CryptoKeyPair> {
  return webcrypto.subtle.generateKey(KEY_ALGORITHM, true, [
    'sign',
    'verify',
  ]) as Promise<CryptoKeyPair>;
}

function saveState(dir: string, state: AuthorityState): void {
  writePublicFile(
    authorityPaths(dir).state,
    `${JSON.stringify(state, null, 2)}\n`,
  );
}

/** Options of {@link initAuthority}. */
export interface InitAuthorityOptions {
  fleetId: string;
  /** Validity of the CA certificate in days. Default 3650. */
  validityDays?: number;
  /** Days from a CRL's issue to its nextUpdate. Default 90. */
  crlDays?: number;
}

/**
 * Creates the fleet CA in `dir/ca`: an ECDSA P-256 key (mode 0600), a
 * self-signed certificate allowed to sign certificates and CRLs, the
 * state file and an empty CRL.
 *
 * @throws {FleetError} INVALID_CONFIG when `dir` already has a CA key.
 * @throws {RangeError} for a fleet id that is not one topic level.
 */
export async function initAuthority(
  dir: string,
  options: InitAuthorityOptions,
): Promise<FleetAuthority> {
  assertTopicLevel('fleet id', options.fleetId);
  const paths = authorityPaths(dir);
  if (existsSync(paths.privateKey)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `a CA key already exists at ${paths.privateKey}; issue certificates ` +
        'with it, or move the folder away to start a new fleet CA',
    );
  }
  const keys = await generateKeyPair();
  const now = Date.now();
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: randomSerial(),
    name: [{ CN: [`fleetlearn fleet ${options.fleetId} CA`] }],
    notBefore: new Date(now - 5 * 60_000),
    notAfter: new Date(now + (options.validityDays ?? 3650) * 86_400_000),
    keys,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(
        x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign,
        true,
      ),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });

  writePrivateKey(paths.privateKey, await exportPrivateKeyPem(keys.privateKey));
  writePublicFile(paths.certificate, certificate.toString('pem'));
  const state: AuthorityState = {
    version: 1,
    fleetId: options.fleetId,
    crlDays: options.crlDays ?? 90,
    crlNumber: 0,
    certificates: [],
  };
  const authority = { dir, state, certificate, privateKey: keys.privateKey };
  await writeCrl(authority);
  return authority;
}

/**
 * Loads the CA of `dir`.
 *
 * @throws {FleetError} INVALID_CONFIG when the CA files are missing, or
 *   the key file is readable by group or others.
 */
export async function loadAuthority(dir: string): Promise<FleetAuthority> {
  const paths = authorityPaths(dir);
  if (!existsSync(paths.state)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `no fleet CA in ${dir}: ${paths.state} is missing; run provision ` +
        'init-ca first',
    );
  }
  assertPrivateKeyFile(paths.privateKey);
  const state = JSON.parse(readFileSync(paths.state, 'utf8')) as AuthorityState;
  const certificate = new x509.X509Certificate(
    readFileSync(paths.certificate, 'utf8'),
  );
  const [der] = x509.PemConverter.decode(
    readFileSync(paths.privateKey, 'utf8'),
  );
  const privateKey = await webcrypto.subtle.importKey(
    'pkcs8',
    der,
    KEY_ALGORITHM,
    false,
    ['sign'],
  );
  return { dir, state, certificate, privateKey };
}

/** Records a newly issued certificate in the state file. */
export function recordIssued(
  authority: FleetAuthority,
  entry: IssuedCertificate,
): void {
  authority.state.certificates.push(entry);
  saveState(authority.dir, authority.state);
}

/** DER encoding of a non-negative integer below 2^31. */
function encodeDerInteger(value: number): Uint8Array<ArrayBuffer> {
  let hex = value.toString(16);
  if (hex.length % 2 === 1) hex = `0${hex}`;
  if (parseInt(hex[0], 16) >= 8) hex = `00${hex}`;
  const body = Buffer.from(hex, 'hex');
  return new Uint8Array([0x02, body.length, ...body]);
}

const CRL_NUMBER_OID = '2.5.29.20';

/**
 * Signs a new CRL listing every revoked certificate, valid for the state's
 * `crlDays`, and writes it to `ca/crl.pem` with the PEM label OpenSSL
 * reads ("X509 CRL"). Increments the CRL number.
 */
export async function writeCrl(authority: FleetAuthority): Promise<string> {
  const { state } = authority;
  state.crlNumber += 1;
  const now = Date.now();
  const revoked = state.certificates.filter(
    (entry) => entry.revokedAt !== undefined,
  );
  const crl = await x509.X509CrlGenerator.create({
    issuer: authority.certificate.subjectName,
    thisUpdate: new Date(now),
    nextUpdate: new Date(now + state.crlDays * 86_400_000),
    signingKey: authority.privateKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    entries: revoked.map((entry) => ({
      serialNumber: entry.serial,
      revocationDate: new Date(entry.revokedAt!),
      reason: x509.X509CrlReason[entry.revocationReason ?? 'unspecified'],
    })),
    extensions: [
      await x509.AuthorityKeyIdentifierExtension.create(
        authority.certificate.publicKey,
      ),
      new x509.Extension(
        CRL_NUMBER_OID,
        false,
        encodeDerInteger(state.crlNumber),
      ),
    ],
  });
  const file = authorityPaths(authority.dir).crl;
  writePublicFile(file, x509.PemConverter.encode(crl.rawData, 'X509 CRL'));
  saveState(authority.dir, state);
  return file;
}
