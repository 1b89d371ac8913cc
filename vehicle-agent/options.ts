import type { LabelledImages } from '../models/index.ts';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  ErrorCode,
  FleetError,
  assertCertificateIdentity,
  assertTopicLevel,
  isTlsBrokerUrl,
  loadClientTls,
  loadSigningKey,
  readPublicKeys,
  type BrokerClientSecurity,
  type ClientTlsFiles,
  type Logger,
  type PublicKeySet,
  type SigningKey,
} from '../protocol/index.ts';
import { checkAttack, type UpdateAttack } from './trainer.ts';

/** Options of a VehicleAgent. Give exactly one of `dataDir` and `frames`. */
export interface VehicleAgentOptions {
  /** Vehicle id; one MQTT topic level. */
  vehicleId: string;
  /** Fleet id; one MQTT topic level. */
  fleetId: string;
  /** Broker URL, for example `mqtt://127.0.0.1:1883`. */
  brokerUrl: string;
  /** Directory for the deployed models and `current.json`. */
  stateDir: string;
  /** Directory of labelled frames, loaded with split "train". */
  dataDir?: string;
  /** At most this many frames from `dataDir`; default all. */
  dataLimit?: number;
  /** Frames in memory, for the simulator. */
  frames?: LabelledImages;
  /** Training backend to try first ("tensorflow", "wasm", "cpu", ...). */
  preferredBackend?: string;
  /** Largest update the agent sends; default 64 MiB. */
  maxMessageBytes?: number;
  /** Base seed, combined with vehicle id and round; default 0. */
  seed?: number;
  /**
   * Mutual TLS: the fleet CA, this vehicle's certificate and its private
   * key, which must have mode 0600 or stricter. Needs an `mqtts://`
   * brokerUrl. The files are read when the agent is constructed.
   */
  tls?: ClientTlsFiles;
  /** MQTT username, for a broker with a users file (development). */
  username?: string;
  /** MQTT password that goes with `username`; never logged. */
  password?: string;
  /**
   * This vehicle's Ed25519 private key (PKCS#8 PEM, mode 0600 or
   * stricter); every update is sent signed with it. Without it updates go
   * out unsigned. Read when the agent is constructed.
   */
  updateSigningKeyPath?: string;
  /**
   * JSON file of the fleet's trusted release keys. With it the agent
   * deploys only releases signed with one of them. Without it (a
   * development fleet) it also accepts unsigned releases and checks no
   * signature. Read when the agent is constructed.
   */
  trustedReleaseKeysPath?: string;
  /**
   * For simulation and testing only: poisons every update this agent
   * sends (see UpdateAttack), so that a test fleet can measure the
   * robust aggregation rules. Never set it on a real vehicle.
   */
  attack?: UpdateAttack;
  /**
   * Tags of this vehicle, for example `{ region: 'eu', type: 'van' }`.
   * Staged rollouts can address cohorts by tag; reports carry them.
   */
  tags?: Record<string, string>;
  /**
   * Frames held out of training and used to measure the accuracy of the
   * deployed models after each deployment and on the report timer;
   * default 0, which reports no accuracy.
   */
  evalFrames?: number;
  /** Time between inference reports in ms; 0 reports only after deployments. Default 60,000. */
  reportIntervalMs?: number;
  /** Parent logger; the agent takes a child with component "agent". */
  log?: Logger;
}

/** Options after validation, with defaults applied. */
export interface ResolvedAgentOptions {
  vehicleId: string;
  fleetId: string;
  brokerUrl: string;
  stateDir: string;
  dataDir: string | undefined;
  dataLimit: number | undefined;
  frames: LabelledImages | undefined;
  preferredBackend: string | undefined;
  maxMessageBytes: number;
  seed: number;
  /** Credentials of the broker connection; undefined for none. */
  security: BrokerClientSecurity | undefined;
  /** Key that signs updates; undefined sends them unsigned. */
  updateSigningKey: SigningKey | undefined;
  /** Trusted release keys; undefined accepts unsigned releases. */
  trustedReleaseKeys: PublicKeySet | undefined;
  /** Simulation and testing only; undefined sends honest updates. */
  attack: UpdateAttack | undefined;
  tags: Record<string, string>;
  evalFrames: number;
  reportIntervalMs: number;
}

/** Default time between inference reports. */
export const DEFAULT_REPORT_INTERVAL_MS = 60_000;

/** Checks the tags option: string keys and values, none empty. */
function checkTags(tags: unknown): Record<string, string> {
  if (tags === undefined) return {};
  if (tags === null || typeof tags !== 'object' || Array.isArray(tags)) {
    throw new TypeError('option tags must be an object of strings');
  }
  const checked: Record<string, string> = {};
  for (const [key, value] of Object.entries(tags)) {
    if (key.length === 0 || typeof value !== 'string' || value.length === 0) {
      throw new TypeError(
        `option tags has ${JSON.stringify(key)}=${JSON.stringify(value)}; ` +
          'expected non-empty string keys and values',
      );
    }
    checked[key] = value;
  }
  return checked;
}

function checkNonNegativeInteger(
  name: string,
  value: number | undefined,
  fallback: number,
): number {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(
      `option ${name} must be an integer >= 0, received ${value}`,
    );
  }
  return value;
}

const BROKER_PROTOCOLS = ['mqtt:', 'mqtts:', 'tcp:', 'tls:', 'ws:', 'wss:'];

function requireString(name: string, value: unknown): string {
  if (typeof value !== 'string' || value.length === 0) {
    throw new TypeError(
      `option ${name} must be a non-empty string, received ` +
        `${value === '' ? 'an empty string' : typeof value}`,
    );
  }
  return value;
}

function checkBrokerUrl(value: unknown): string {
  const text = requireString('brokerUrl', value);
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new TypeError(
      `option brokerUrl ${JSON.stringify(text)} is not a URL; expected ` +
        'for example mqtt://127.0.0.1:1883',
    );
  }
  if (!BROKER_PROTOCOLS.includes(url.protocol)) {
    throw new RangeError(
      `option brokerUrl has protocol ${url.protocol}, expected one of ` +
        BROKER_PROTOCOLS.join(' '),
    );
  }
  return text;
}

function checkFrames(frames: LabelledImages): LabelledImages {
  const valuesPerImage = 32 * 32 * 3;
  if (
    !(frames.images instanceof Float32Array) ||
    !(frames.labels instanceof Int32Array) ||
    !Number.isInteger(frames.count) ||
    frames.count < 1
  ) {
    throw new TypeError(
      'option frames must hold Float32Array images, Int32Array labels and ' +
        'a count of at least 1',
    );
  }
  if (
    frames.images.length !== frames.count * valuesPerImage ||
    frames.labels.length !== frames.count
  ) {
    throw new RangeError(
      `option frames has count ${frames.count} but ` +
        `${frames.images.length} image values and ${frames.labels.length} ` +
        `labels; expected ${frames.count * valuesPerImage} and ${frames.count}`,
    );
  }
  return frames;
}

function checkPositiveInteger(
  name: string,
  value: number | undefined,
  fallback: number | undefined,
): number | undefined {
  if (value === undefined) return fallback;
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new RangeError(
      `option ${name} must be a positive integer, received ${value}`,
    );
  }
  return value;
}

/**
 * Loads the TLS files and checks that they suit the broker URL and the
 * vehicle; returns undefined without TLS, username or password.
 */
function resolveSecurity(
  options: VehicleAgentOptions,
  brokerUrl: string,
): BrokerClientSecurity | undefined {
  const { tls, username, password } = options;
  if (password !== undefined && username === undefined) {
    throw new TypeError('option password needs the option username');
  }
  if (username !== undefined) requireString('username', username);
  if (tls === undefined) {
    return username === undefined ? undefined : { username, password };
  }
  if (!isTlsBrokerUrl(brokerUrl)) {
    throw new RangeError(
      `option tls is set but brokerUrl ${brokerUrl} is not a TLS URL; ` +
        'use mqtts://',
    );
  }
  const material = loadClientTls({
    caPath: requireString('tls.caPath', tls.caPath),
    certPath: requireString('tls.certPath', tls.certPath),
    keyPath: requireString('tls.keyPath', tls.keyPath),
  });
  assertCertificateIdentity(material, {
    role: 'vehicle',
    fleetId: options.fleetId,
    vehicleId: options.vehicleId,
  });
  return { tls: material, username, password };
}

/** Reads the trusted release keys; the file must list at least one. */
function readTrustedReleaseKeys(keysPath: string): PublicKeySet {
  const keys = readPublicKeys(
    requireString('trustedReleaseKeysPath', keysPath),
  );
  if (keys.size === 0) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `option trustedReleaseKeysPath names ${keysPath}, which lists no ` +
        'key; every release would be rejected',
    );
  }
  return keys;
}

/**
 * Checks the options of a VehicleAgent, applies defaults and reads the TLS
 * and signing key files.
 *
 * @throws {TypeError} for a missing or wrongly typed option.
 * @throws {RangeError} for an id that is not one topic level, a value out
 *   of range, or TLS files with a broker URL that is not TLS.
 * @throws {FleetError} INVALID_CONFIG for a TLS or key file that cannot
 *   be read, a private key file that its group or others can read, a
 *   certificate issued for another vehicle or fleet, a key that is not
 *   Ed25519, or a trusted release key file that lists no key.
 */
export function resolveAgentOptions(
  options: VehicleAgentOptions,
): ResolvedAgentOptions {
  if (options === null || typeof options !== 'object') {
    throw new TypeError('VehicleAgent options must be an object');
  }
  const vehicleId = requireString('vehicleId', options.vehicleId);
  const fleetId = requireString('fleetId', options.fleetId);
  assertTopicLevel('vehicle id', vehicleId);
  assertTopicLevel('fleet id', fleetId);

  const hasDir = options.dataDir !== undefined;
  const hasFrames = options.frames !== undefined;
  if (hasDir === hasFrames) {
    throw new TypeError(
      'VehicleAgent needs exactly one of the options dataDir and frames, ' +
        `received ${hasDir ? 'both' : 'neither'}`,
    );
  }

  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed)) {
    throw new RangeError(
      `option seed must be a safe integer, received ${seed}`,
    );
  }

  const brokerUrl = checkBrokerUrl(options.brokerUrl);
  if (options.attack !== undefined) checkAttack(options.attack);
  return {
    vehicleId,
    fleetId,
    brokerUrl,
    stateDir: requireString('stateDir', options.stateDir),
    dataDir: hasDir ? requireString('dataDir', options.dataDir) : undefined,
    dataLimit: checkPositiveInteger('dataLimit', options.dataLimit, undefined),
    frames: hasFrames ? checkFrames(options.frames!) : undefined,
    preferredBackend: options.preferredBackend,
    maxMessageBytes: checkPositiveInteger(
      'maxMessageBytes',
      options.maxMessageBytes,
      DEFAULT_MAX_MESSAGE_BYTES,
    )!,
    seed,
    security: resolveSecurity(options, brokerUrl),
    updateSigningKey:
      options.updateSigningKeyPath === undefined
        ? undefined
        : loadSigningKey(
            requireString('updateSigningKeyPath', options.updateSigningKeyPath),
          ),
    trustedReleaseKeys:
      options.trustedReleaseKeysPath === undefined
        ? undefined
        : readTrustedReleaseKeys(options.trustedReleaseKeysPath),
    attack: options.attack === undefined ? undefined : { ...options.attack },
    tags: checkTags(options.tags),
    evalFrames: checkNonNegativeInteger('evalFrames', options.evalFrames, 0),
    reportIntervalMs: checkNonNegativeInteger(
      'reportIntervalMs',
      options.reportIntervalMs,
      DEFAULT_REPORT_INTERVAL_MS,
    ),
  };
}
