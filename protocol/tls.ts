/**
 * Client side of the fleet's transport security: fleet identities as they
 * appear in certificates, loading a client certificate and its private key,
 * the JSON client configuration that provisioning writes, and the mqtt.js
 * options built from them.
 */
import { X509Certificate } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import type { IClientOptions } from 'mqtt';
import { ErrorCode, FleetError } from './errors.ts';
import { assertTopicLevel } from './topics.ts';

/** Role of a fleet identity; the broker's ACL depends on it. */
export type FleetRole = 'vehicle' | 'aggregator';

/** Identity of a client, from its certificate or the broker's users file. */
export interface FleetIdentity {
  role: FleetRole;
  fleetId: string;
  /** Vehicle id; set for the vehicle role only. */
  vehicleId?: string;
}

/** Paths of the PEM files a client needs for mutual TLS. */
export interface ClientTlsFiles {
  /** Fleet CA certificate, which must have signed the broker's certificate. */
  caPath: string;
  /** The client's certificate, signed by the fleet CA. */
  certPath: string;
  /** The client's private key; mode 0600 or stricter. */
  keyPath: string;
}

/** PEM contents read from {@link ClientTlsFiles}. */
export interface ClientTlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  /** Source paths of the contents, for error messages and logs. */
  files: ClientTlsFiles;
}

/**
 * Credentials of one MQTT connection: a client certificate, a username and
 * password (development), or both.
 */
export interface BrokerClientSecurity {
  tls?: ClientTlsMaterial;
  username?: string;
  password?: string;
}

/** Contents of the JSON file that `provision issue-*` writes for a client. */
export interface FleetClientConfig {
  brokerUrl: string;
  fleetId: string;
  /** Set in a vehicle's configuration. */
  vehicleId?: string;
  /** Absolute paths, resolved against the configuration file's folder. */
  tls: ClientTlsFiles;
}

const URN_PREFIX = 'urn:fleetlearn';

/** Broker URL protocols that mqtt.js runs over TLS. */
export const TLS_BROKER_PROTOCOLS: readonly string[] = [
  'mqtts:',
  'tls:',
  'ssl:',
  'wss:',
];

/**
 * Formats the URI that a fleet certificate carries as its subject
 * alternative name: `urn:fleetlearn:<fleet>:vehicle:<vehicle>` or
 * `urn:fleetlearn:<fleet>:aggregator`. Ids are percent-encoded, so a ":"
 * inside an id cannot shift the fields.
 *
 * @throws {RangeError} for an id that is not one MQTT topic level, or a
 *   vehicle identity without a vehicle id.
 */
export function formatIdentityUri(identity: FleetIdentity): string {
  assertTopicLevel('fleet id', identity.fleetId);
  const fleet = encodeURIComponent(identity.fleetId);
  if (identity.role === 'aggregator')
    return `${URN_PREFIX}:${fleet}:aggregator`;
  if (identity.vehicleId === undefined) {
    throw new RangeError('a vehicle identity needs a vehicleId');
  }
  assertTopicLevel('vehicle id', identity.vehicleId);
  const vehicle = encodeURIComponent(identity.vehicleId);
  return `${URN_PREFIX}:${fleet}:vehicle:${vehicle}`;
}

/**
 * Parses a URI made by {@link formatIdentityUri}. Returns undefined for any
 * other URI, including one whose ids are not valid topic levels.
 */
export function parseIdentityUri(uri: string): FleetIdentity | undefined {
  const parts = uri.split(':');
  if (parts.length < 4 || `${parts[0]}:${parts[1]}` !== URN_PREFIX) {
    return undefined;
  }
  try {
    const fleetId = decodeURIComponent(parts[2]);
    assertTopicLevel('fleet id', fleetId);
    if (parts.length === 4 && parts[3] === 'aggregator') {
      return { role: 'aggregator', fleetId };
    }
    if (parts.length === 5 && parts[3] === 'vehicle') {
      const vehicleId = decodeURIComponent(parts[4]);
      assertTopicLevel('vehicle id', vehicleId);
      return { role: 'vehicle', fleetId, vehicleId };
    }
  } catch {
    // A malformed escape or an invalid id: not a fleet identity.
  }
  return undefined;
}

/**
 * Returns the MQTT client id an identity must connect with:
 * `vehicle-<vehicleId>` or `aggregator-<fleetId>`.
 */
export function clientIdOf(identity: FleetIdentity): string {
  return identity.role === 'vehicle'
    ? `vehicle-${identity.vehicleId}`
    : `aggregator-${identity.fleetId}`;
}

/**
 * Returns every client id an identity may connect with: clientIdOf, and
 * for the aggregator identity also `aggregator-<fleet>-rollout`, the id
 * of the rollout controller, which runs with the aggregator's
 * credentials beside the aggregator.
 */
export function clientIdsOf(identity: FleetIdentity): string[] {
  const primary = clientIdOf(identity);
  return identity.role === 'vehicle'
    ? [primary]
    : [primary, `${primary}-rollout`];
}

/**
 * Returns the fleet identities in the URI subject alternative names of a
 * certificate (PEM or DER). A certificate from `provision` has exactly one.
 */
export function identitiesOfCertificate(
  certificate: Buffer | string,
): FleetIdentity[] {
  const altNames = new X509Certificate(certificate).subjectAltName ?? '';
  // Node lists names as `URI:<value>, DNS:<value>`; provisioning writes
  // URIs without commas or quotes, so a plain split is exact for them.
  return altNames
    .split(', ')
    .filter((name) => name.startsWith('URI:'))
    .map((name) => parseIdentityUri(name.slice('URI:'.length)))
    .filter((identity) => identity !== undefined);
}

/** True when mqtt.js connects to `brokerUrl` over TLS. */
export function isTlsBrokerUrl(brokerUrl: string): boolean {
  try {
    return TLS_BROKER_PROTOCOLS.includes(new URL(brokerUrl).protocol);
  } catch {
    return false;
  }
}

/**
 * Checks that a private key file exists and that neither its group nor
 * other users may read or write it. On Windows, where POSIX modes do not
 * apply, only existence is checked.
 *
 * @throws {FleetError} INVALID_CONFIG naming the path, its mode and the
 *   `chmod 600` that fixes it, or naming the missing file.
 */
export function assertPrivateKeyFile(keyPath: string): void {
  let mode: number;
  try {
    mode = statSync(keyPath).mode;
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `private key file ${keyPath} cannot be read: ${(err as Error).message}`,
      { cause: err },
    );
  }
  if (process.platform === 'win32' || (mode & 0o077) === 0) return;
  const octal = (mode & 0o777).toString(8).padStart(4, '0');
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `private key file ${keyPath} has mode ${octal}, so its group or other ` +
      `users can access it; expected 0600. Run: chmod 600 ${keyPath}`,
  );
}

function readPem(kind: string, file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `${kind} file ${file} cannot be read: ${(err as Error).message}`,
      { cause: err },
    );
  }
}

/**
 * Reads the CA certificate, client certificate and private key, after
 * checking the key file's mode with {@link assertPrivateKeyFile}.
 *
 * @throws {FleetError} INVALID_CONFIG for a missing file or a key file
 *   that its group or others can read.
 */
export function loadClientTls(files: ClientTlsFiles): ClientTlsMaterial {
  assertPrivateKeyFile(files.keyPath);
  return {
    ca: readPem('CA certificate', files.caPath),
    cert: readPem('certificate', files.certPath),
    key: readPem('private key', files.keyPath),
    files: { ...files },
  };
}

/**
 * Checks that the client certificate in `material` carries `expected` as
 * its fleet identity, so that a wrong certificate fails before the broker
 * rejects it.
 *
 * @throws {FleetError} INVALID_CONFIG naming the certificate file and the
 *   identities found in it.
 */
export function assertCertificateIdentity(
  material: ClientTlsMaterial,
  expected: FleetIdentity,
): void {
  let found: FleetIdentity[];
  try {
    found = identitiesOfCertificate(material.cert);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `certificate file ${material.files.certPath} is not a PEM ` +
        `certificate: ${(err as Error).message}`,
      { cause: err },
    );
  }
  const wanted = formatIdentityUri(expected);
  if (found.some((identity) => formatIdentityUri(identity) === wanted)) return;
  const names = found.map(formatIdentityUri).join(', ') || 'none';
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `certificate file ${material.files.certPath} is for ${names}, ` +
      `expected ${wanted}`,
  );
}

function configField(
  configPath: string,
  config: Record<string, unknown>,
  key: string,
): string {
  const value = config[key];
  if (typeof value !== 'string' || value.length === 0) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `client configuration ${configPath} has no string field "${key}"`,
    );
  }
  return value;
}

/**
 * Reads a client configuration written by provisioning. Relative
 * certificate and key paths are resolved against the file's folder, so the
 * folder can be copied to a vehicle as a whole.
 *
 * @throws {FleetError} INVALID_CONFIG for a missing or unreadable file,
 *   invalid JSON or a missing field.
 */
export function readClientConfig(configPath: string): FleetClientConfig {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(configPath, 'utf8'));
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `client configuration ${configPath} cannot be read as JSON: ` +
        (err as Error).message,
      { cause: err },
    );
  }
  if (parsed === null || typeof parsed !== 'object') {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `client configuration ${configPath} is not a JSON object`,
    );
  }
  const config = parsed as Record<string, unknown>;
  const folder = path.dirname(path.resolve(configPath));
  const file = (key: string): string =>
    path.resolve(folder, configField(configPath, config, key));
  const vehicleId = config.vehicleId;
  return {
    brokerUrl: configField(configPath, config, 'brokerUrl'),
    fleetId: configField(configPath, config, 'fleetId'),
    vehicleId: typeof vehicleId === 'string' ? vehicleId : undefined,
    tls: {
      caPath: file('caPath'),
      certPath: file('certPath'),
      keyPath: file('keyPath'),
    },
  };
}

/**
 * Returns the mqtt.js options for `security`: CA, certificate and key with
 * server certificate verification on, and the username and password when
 * given. Returns an empty object for undefined.
 */
export function toMqttSecurityOptions(
  security: BrokerClientSecurity | undefined,
): Partial<IClientOptions> {
  if (security === undefined) return {};
  const options: Partial<IClientOptions> = {};
  if (security.tls !== undefined) {
    options.ca = security.tls.ca;
    options.cert = security.tls.cert;
    options.key = security.tls.key;
    options.rejectUnauthorized = true;
  }
  if (security.username !== undefined) options.username = security.username;
  if (security.password !== undefined) options.password = security.password;
  return options;
}
