/**
 * Ed25519 signing keys of a provisioning folder: the fleet's release keys
 * (the aggregator signs release notices) and each vehicle's update key.
 *
 * Layout inside the folder:
 * - `release-keys.json`: every trusted release key and the active one;
 * - `aggregator/release-keys/<keyId>.key.pem`: release private keys;
 * - `aggregator/vehicle-keys/<vehicleId>.json`: vehicles' public keys;
 * - `vehicles/<id>/update-signing.key.pem` and
 *   `vehicles/<id>/trusted-release-keys.json`: a vehicle's copies.
 */
import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import {
  ErrorCode,
  FleetError,
  formatPublicKeyFile,
  generateSigningKeyPair,
  type PublicKeyEntry,
} from '../../protocol/index.ts';
import {
  ensurePrivateFolder,
  writePrivateKey,
  writePublicFile,
} from './files.ts';

/** File names inside a vehicle's folder. */
export const VEHICLE_UPDATE_KEY_FILE = 'update-signing.key.pem';
export const VEHICLE_TRUSTED_KEYS_FILE = 'trusted-release-keys.json';

/** `release-keys.json`: a public key file plus the active key's id. */
export interface ReleaseKeyList {
  /** Key the aggregator signs with; aggregator.json names its file. */
  activeKeyId: string;
  /** Every key vehicles trust, oldest first. */
  keys: PublicKeyEntry[];
}

/** Paths of the signing files in provisioning folder `dir`. */
export function signingPaths(dir: string) {
  const aggregator = path.join(dir, 'aggregator');
  return {
    releaseKeyList: path.join(dir, 'release-keys.json'),
    releaseKeyFolder: path.join(aggregator, 'release-keys'),
    vehicleKeyFolder: path.join(aggregator, 'vehicle-keys'),
    aggregatorConfig: path.join(aggregator, 'aggregator.json'),
    vehiclesFolder: path.join(dir, 'vehicles'),
  };
}

/** Path of the private key file of release key `keyId`. */
export function releaseKeyPath(dir: string, keyId: string): string {
  return path.join(signingPaths(dir).releaseKeyFolder, `${keyId}.key.pem`);
}

/** Reads `release-keys.json`; undefined when the folder has no release keys. */
export function readReleaseKeyList(dir: string): ReleaseKeyList | undefined {
  const file = signingPaths(dir).releaseKeyList;
  if (!existsSync(file)) return undefined;
  return JSON.parse(readFileSync(file, 'utf8')) as ReleaseKeyList;
}

function requireReleaseKeyList(dir: string): ReleaseKeyList {
  const list = readReleaseKeyList(dir);
  if (list === undefined) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `no release keys in ${dir}: ${signingPaths(dir).releaseKeyList} is ` +
        'missing; run provision init-signing first',
    );
  }
  return list;
}

function saveReleaseKeyList(dir: string, list: ReleaseKeyList): void {
  writePublicFile(
    signingPaths(dir).releaseKeyList,
    `${JSON.stringify(list, null, 2)}\n`,
  );
}

/** Creates a release key pair; returns its public entry. */
function createReleaseKey(dir: string): PublicKeyEntry {
  const pair = generateSigningKeyPair();
  writePrivateKey(releaseKeyPath(dir, pair.keyId), pair.privateKeyPem);
  return { keyId: pair.keyId, publicKey: pair.publicKeyPem };
}

/**
 * Creates the fleet's first release key (private key mode 0600) and
 * `release-keys.json` with it as the active key. Returns its key id.
 *
 * @throws {FleetError} INVALID_CONFIG when the folder has release keys.
 */
export function initReleaseSigning(dir: string): string {
  const file = signingPaths(dir).releaseKeyList;
  if (existsSync(file)) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `release keys already exist in ${file}; use rotate-release-key to ` +
        'add a new one',
    );
  }
  ensurePrivateFolder(signingPaths(dir).vehicleKeyFolder);
  const entry = createReleaseKey(dir);
  saveReleaseKeyList(dir, { activeKeyId: entry.keyId, keys: [entry] });
  return entry.keyId;
}

/**
 * Writes `trusted-release-keys.json` into every vehicle folder. Returns
 * the number of folders written.
 */
export function refreshVehicleTrustedKeys(dir: string): number {
  const list = readReleaseKeyList(dir);
  const folder = signingPaths(dir).vehiclesFolder;
  if (list === undefined || !existsSync(folder)) return 0;
  let count = 0;
  for (const name of readdirSync(folder)) {
    const vehicleFolder = path.join(folder, name);
    if (!existsSync(path.join(vehicleFolder, 'agent.json'))) continue;
    writePublicFile(
      path.join(vehicleFolder, VEHICLE_TRUSTED_KEYS_FILE),
      formatPublicKeyFile(list.keys),
    );
    count += 1;
  }
  return count;
}

/**
 * Adds a new release key to the trusted list, next to the active one, and
 * refreshes every vehicle's copy. The aggregator keeps signing with the
 * old key until {@link activateReleaseKey}. Returns the new key id.
 *
 * @throws {FleetError} INVALID_CONFIG when the folder has no release keys.
 */
export function rotateReleaseKey(dir: string): string {
  const list = requireReleaseKeyList(dir);
  const entry = createReleaseKey(dir);
  saveReleaseKeyList(dir, { ...list, keys: [...list.keys, entry] });
  refreshVehicleTrustedKeys(dir);
  return entry.keyId;
}

function requireListed(list: ReleaseKeyList, keyId: string): void {
  if (list.keys.some((entry) => entry.keyId === keyId)) return;
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `release key ${keyId} is not in the trusted list (keys: ` +
      `${list.keys.map((entry) => entry.keyId).join(', ')})`,
  );
}

/**
 * Makes `keyId` the key the aggregator signs with, and points
 * aggregator.json at it when that file exists. Vehicles must trust the
 * key before the aggregator restarts with it.
 *
 * @throws {FleetError} INVALID_CONFIG for a key not in the trusted list.
 */
export function activateReleaseKey(dir: string, keyId: string): void {
  const list = requireReleaseKeyList(dir);
  requireListed(list, keyId);
  saveReleaseKeyList(dir, { ...list, activeKeyId: keyId });
  const configPath = signingPaths(dir).aggregatorConfig;
  if (!existsSync(configPath)) return;
  const config = JSON.parse(readFileSync(configPath, 'utf8')) as Record<
    string,
    unknown
  >;
  config.releaseSigningKeyPath = relativeTo(
    path.dirname(configPath),
    releaseKeyPath(dir, keyId),
  );
  writePublicFile(configPath, `${JSON.stringify(config, null, 2)}\n`);
}

/**
 * Removes `keyId` from the trusted list, refreshes every vehicle's copy
 * and deletes its private key file.
 *
 * @throws {FleetError} INVALID_CONFIG for the active key or a key not in
 *   the trusted list.
 */
export function retireReleaseKey(dir: string, keyId: string): void {
  const list = requireReleaseKeyList(dir);
  requireListed(list, keyId);
  if (keyId === list.activeKeyId) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `release key ${keyId} is the active key; activate another one first`,
    );
  }
  const keys = list.keys.filter((entry) => entry.keyId !== keyId);
  saveReleaseKeyList(dir, { ...list, keys });
  refreshVehicleTrustedKeys(dir);
  rmSync(releaseKeyPath(dir, keyId), { force: true });
}

function relativeTo(folder: string, file: string): string {
  return path.relative(folder, file) || path.basename(file);
}

/**
 * Signing fields of aggregator.json, relative to `folder`: the active
 * release key, when the folder has release keys, and the vehicle key
 * folder, which the aggregator reads to check signed updates.
 */
export function aggregatorSigningFields(
  dir: string,
  folder: string,
): Record<string, string> {
  const paths = signingPaths(dir);
  ensurePrivateFolder(paths.vehicleKeyFolder);
  const fields: Record<string, string> = {
    vehicleKeysPath: relativeTo(folder, paths.vehicleKeyFolder),
  };
  const list = readReleaseKeyList(dir);
  if (list !== undefined) {
    fields.releaseSigningKeyPath = relativeTo(
      folder,
      releaseKeyPath(dir, list.activeKeyId),
    );
  }
  return fields;
}

/**
 * Creates a vehicle's update-signing key in its folder (mode 0600),
 * registers the public key in `aggregator/vehicle-keys/<id>.json`
 * (replacing an earlier one), and copies the trusted release keys when
 * the folder has any. Returns the agent.json fields, relative to the
 * vehicle's folder, and the key id.
 */
export function provisionVehicleSigning(
  dir: string,
  vehicleId: string,
  folder: string,
): { fields: Record<string, string>; keyId: string } {
  const pair = generateSigningKeyPair();
  writePrivateKey(
    path.join(folder, VEHICLE_UPDATE_KEY_FILE),
    pair.privateKeyPem,
  );
  writePublicFile(
    path.join(signingPaths(dir).vehicleKeyFolder, `${vehicleId}.json`),
    formatPublicKeyFile([
      { keyId: pair.keyId, publicKey: pair.publicKeyPem, vehicleId },
    ]),
  );
  const fields: Record<string, string> = {
    updateSigningKeyPath: VEHICLE_UPDATE_KEY_FILE,
  };
  const list = readReleaseKeyList(dir);
  if (list !== undefined) {
    writePublicFile(
      path.join(folder, VEHICLE_TRUSTED_KEYS_FILE),
      formatPublicKeyFile(list.keys),
    );
    fields.trustedReleaseKeysPath = VEHICLE_TRUSTED_KEYS_FILE;
  }
  return { fields, keyId: pair.keyId };
}

/**
 * Deletes a vehicle's registered update key, so that an aggregator
 * started afterwards rejects its updates. Returns false when none was
 * registered.
 */
export function removeVehicleKey(dir: string, vehicleId: string): boolean {
  const file = path.join(
    signingPaths(dir).vehicleKeyFolder,
    `${vehicleId}.json`,
  );
  if (!existsSync(file)) return false;
  rmSync(file);
  return true;
}
