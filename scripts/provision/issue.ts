/** Issuing broker, aggregator and vehicle certificates from the fleet CA. */
import { copyFileSync } from 'node:fs';
import { isIP } from 'node:net';
import path from 'node:path';
import {
  assertTopicLevel,
  clientIdOf,
  formatIdentityUri,
  type FleetIdentity,
} from '../../protocol/index.ts';
import {
  authorityPaths,
  exportPrivateKeyPem,
  generateKeyPair,
  randomSerial,
  recordIssued,
  type CertificateRole,
  type FleetAuthority,
} from './authority.ts';
import {
  ensurePrivateFolder,
  writePrivateKey,
  writePublicFile,
} from './files.ts';
import { aggregatorSigningFields, provisionVehicleSigning } from './signing.ts';
import { SIGNING_ALGORITHM, x509 } from './x509.ts';

/** Files written for one certificate. */
export interface IssuedFiles {
  folder: string;
  certificatePath: string;
  privateKeyPath: string;
  /** Copy of the CA certificate, so the folder is complete on its own. */
  caPath: string;
  /** Client configuration; not written for the broker. */
  configPath?: string;
  serial: string;
  /** A vehicle's update-signing key (mode 0600); vehicles only. */
  updateSigningKeyPath?: string;
  /** Key id of `updateSigningKeyPath`. */
  updateKeyId?: string;
}

interface LeafRequest {
  role: CertificateRole;
  name: string;
  commonName: string;
  altNames: x509.JsonGeneralNames;
  usage: x509.ExtendedKeyUsage;
  folder: string;
  fileStem: string;
  validityDays: number;
}

/** Default validity of a leaf certificate, in days. */
export const DEFAULT_LEAF_VALIDITY_DAYS = 365;

async function issueLeaf(
  authority: FleetAuthority,
  request: LeafRequest,
): Promise<IssuedFiles> {
  const keys = await generateKeyPair();
  const now = Date.now();
  const notAfter = new Date(now + request.validityDays * 86_400_000);
  const serial = randomSerial();
  const certificate = await x509.X509CertificateGenerator.create({
    serialNumber: serial,
    subject: [{ CN: [request.commonName] }, { O: ['fleetlearn'] }],
    issuer: authority.certificate.subjectName,
    notBefore: new Date(now - 5 * 60_000),
    notAfter,
    publicKey: keys.publicKey,
    signingKey: authority.privateKey,
    signingAlgorithm: SIGNING_ALGORITHM,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([request.usage]),
      new x509.SubjectAlternativeNameExtension(request.altNames),
      await x509.AuthorityKeyIdentifierExtension.create(
        authority.certificate.publicKey,
      ),
    ],
  });

  ensurePrivateFolder(request.folder);
  const files: IssuedFiles = {
    folder: request.folder,
    certificatePath: path.join(request.folder, `${request.fileStem}.cert.pem`),
    privateKeyPath: path.join(request.folder, `${request.fileStem}.key.pem`),
    caPath: path.join(request.folder, 'ca.cert.pem'),
    serial,
  };
  writePrivateKey(
    files.privateKeyPath,
    await exportPrivateKeyPem(keys.privateKey),
  );
  writePublicFile(files.certificatePath, certificate.toString('pem'));
  copyFileSync(authorityPaths(authority.dir).certificate, files.caPath);
  recordIssued(authority, {
    serial,
    role: request.role,
    name: request.name,
    issuedAt: new Date(now).toISOString(),
    notAfter: notAfter.toISOString(),
  });
  return files;
}

/**
 * Issues the broker's server certificate for `hosts` (IP addresses become
 * IP SANs, names DNS SANs) into `dir/broker`.
 *
 * @throws {RangeError} for an empty host list.
 */
export async function issueBroker(
  authority: FleetAuthority,
  options: { hosts: string[]; validityDays?: number },
): Promise<IssuedFiles> {
  if (options.hosts.length === 0) {
    throw new RangeError('the broker certificate needs at least one host');
  }
  return issueLeaf(authority, {
    role: 'broker',
    name: 'broker',
    commonName: options.hosts[0],
    altNames: options.hosts.map((host) => ({
      type: isIP(host) === 0 ? 'dns' : 'ip',
      value: host,
    })),
    usage: x509.ExtendedKeyUsage.serverAuth,
    folder: path.join(authority.dir, 'broker'),
    fileStem: 'broker',
    validityDays: options.validityDays ?? DEFAULT_LEAF_VALIDITY_DAYS,
  });
}

function relativeConfig(
  files: IssuedFiles,
  fields: Record<string, string>,
): string {
  const relative = (file: string): string =>
    path.relative(files.folder, file) || path.basename(file);
  const config = {
    ...fields,
    caPath: relative(files.caPath),
    certPath: relative(files.certificatePath),
    keyPath: relative(files.privateKeyPath),
  };
  return `${JSON.stringify(config, null, 2)}\n`;
}

/**
 * Issues a client certificate and writes its configuration. `signing`
 * creates the signing files in the new folder and returns their
 * configuration fields, relative to the folder.
 */
async function issueClient(
  authority: FleetAuthority,
  identity: FleetIdentity,
  options: { brokerUrl: string; validityDays?: number },
  layout: { folder: string; fileStem: string; configName: string },
  signing: (files: IssuedFiles) => Record<string, string>,
): Promise<IssuedFiles> {
  const files = await issueLeaf(authority, {
    role: identity.role,
    name: identity.vehicleId ?? identity.role,
    commonName: clientIdOf(identity),
    altNames: [{ type: 'url', value: formatIdentityUri(identity) }],
    usage: x509.ExtendedKeyUsage.clientAuth,
    folder: layout.folder,
    fileStem: layout.fileStem,
    validityDays: options.validityDays ?? DEFAULT_LEAF_VALIDITY_DAYS,
  });
  const fields: Record<string, string> = {
    brokerUrl: options.brokerUrl,
    fleetId: identity.fleetId,
  };
  if (identity.vehicleId !== undefined) fields.vehicleId = identity.vehicleId;
  Object.assign(fields, signing(files));
  files.configPath = path.join(layout.folder, layout.configName);
  writePublicFile(files.configPath, relativeConfig(files, fields));
  return files;
}

/**
 * Issues the aggregator's client certificate
 * (`urn:fleetlearn:<fleet>:aggregator`) and its configuration
 * `aggregator.json` into `dir/aggregator`. The configuration names the
 * vehicle key folder and, when the folder has release keys, the active
 * release key.
 */
export async function issueAggregator(
  authority: FleetAuthority,
  options: { brokerUrl: string; validityDays?: number },
): Promise<IssuedFiles> {
  const identity: FleetIdentity = {
    role: 'aggregator',
    fleetId: authority.state.fleetId,
  };
  return issueClient(
    authority,
    identity,
    options,
    {
      folder: path.join(authority.dir, 'aggregator'),
      fileStem: 'aggregator',
      configName: 'aggregator.json',
    },
    (files) => aggregatorSigningFields(authority.dir, files.folder),
  );
}

/**
 * Issues a vehicle's client certificate
 * (`urn:fleetlearn:<fleet>:vehicle:<id>`), its update-signing key, and the
 * agent configuration `agent.json` into `dir/vehicles/<id>`, a folder to
 * copy to the vehicle. The key's public half is registered where the
 * aggregator reads vehicle keys, replacing an earlier one, and the folder
 * gets the fleet's trusted release keys when there are any.
 *
 * @throws {RangeError} for a vehicle id that is not one topic level, or
 *   is "." or "..".
 */
export async function issueVehicle(
  authority: FleetAuthority,
  options: { vehicleId: string; brokerUrl: string; validityDays?: number },
): Promise<IssuedFiles> {
  assertTopicLevel('vehicle id', options.vehicleId);
  if (options.vehicleId === '.' || options.vehicleId === '..') {
    throw new RangeError(
      `vehicle id ${options.vehicleId} cannot name a folder of its own`,
    );
  }
  const identity: FleetIdentity = {
    role: 'vehicle',
    fleetId: authority.state.fleetId,
    vehicleId: options.vehicleId,
  };
  return issueClient(
    authority,
    identity,
    options,
    {
      folder: path.join(authority.dir, 'vehicles', options.vehicleId),
      fileStem: 'vehicle',
      configName: 'agent.json',
    },
    (files) => {
      const signing = provisionVehicleSigning(
        authority.dir,
        options.vehicleId,
        files.folder,
      );
      files.updateSigningKeyPath = path.join(
        files.folder,
        signing.fields.updateSigningKeyPath,
      );
      files.updateKeyId = signing.keyId;
      return signing.fields;
    },
  );
}
