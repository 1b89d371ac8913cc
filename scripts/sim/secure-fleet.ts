/**
 * The `--secure` mode of the simulator. It makes a temporary fleet PKI
 * with the provisioning code and runs the broker with mutual TLS and its
 * ACL. The aggregator and every vehicle get their signing keys from the
 * configuration files that provisioning writes.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { AggregatorOptions } from '../../aggregator/index.ts';
import type { BrokerTlsOptions } from '../../broker/index.ts';
import {
  loadClientTls,
  readClientConfig,
  readSigningConfig,
  type Logger,
} from '../../protocol/index.ts';
import type { VehicleAgentOptions } from '../../vehicle-agent/index.ts';
import {
  authorityPaths,
  initAuthority,
  initReleaseSigning,
  issueAggregator,
  issueBroker,
  issueVehicle,
} from '../provision/index.ts';

/** Security options of the simulated broker, aggregator and vehicles. */
export interface SecureFleet {
  /** Broker TLS with client certificates and the CRL. */
  brokerTls: BrokerTlsOptions;
  /** Client certificate and signing keys of the aggregator. */
  aggregator: Pick<
    AggregatorOptions,
    'security' | 'releaseSigningKeyPath' | 'vehicleKeysPath'
  >;
  /** Client certificate and signing keys of one vehicle. */
  vehicle(
    vehicleId: string,
  ): Pick<
    VehicleAgentOptions,
    'tls' | 'updateSigningKeyPath' | 'trustedReleaseKeysPath'
  >;
  /** Id of the key that signs releases. */
  releaseKeyId: string;
  /** Deletes the temporary PKI with every private key in it. */
  remove(): void;
}

/**
 * Provisions a temporary PKI for `fleetId`: the CA, the release-signing
 * key, the broker's certificate for 127.0.0.1, the aggregator and one
 * vehicle per id, each with its update-signing key.
 */
export async function provisionSecureFleet(
  fleetId: string,
  vehicleIds: readonly string[],
  log: Logger,
): Promise<SecureFleet> {
  const dir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-sim-pki-'));
  try {
    const brokerUrl = 'mqtts://127.0.0.1';
    const authority = await initAuthority(dir, { fleetId });
    const releaseKeyId = initReleaseSigning(dir);
    const broker = await issueBroker(authority, {
      hosts: ['127.0.0.1', 'localhost'],
    });
    const aggregator = await issueAggregator(authority, { brokerUrl });
    const vehicleConfigs = new Map<string, string>();
    for (const vehicleId of vehicleIds) {
      const files = await issueVehicle(authority, { vehicleId, brokerUrl });
      vehicleConfigs.set(vehicleId, files.configPath!);
    }
    log.info(
      { dir, vehicles: vehicleIds.length, releaseKeyId },
      'simulation pki provisioned',
    );

    const paths = authorityPaths(dir);
    const aggregatorConfig = readClientConfig(aggregator.configPath!);
    const aggregatorSigning = readSigningConfig(aggregator.configPath!);
    return {
      brokerTls: {
        certPath: broker.certificatePath,
        keyPath: broker.privateKeyPath,
        caPath: paths.certificate,
        crlPath: paths.crl,
      },
      aggregator: {
        security: { tls: loadClientTls(aggregatorConfig.tls) },
        releaseSigningKeyPath: aggregatorSigning.releaseSigningKeyPath,
        vehicleKeysPath: aggregatorSigning.vehicleKeysPath,
      },
      vehicle: (vehicleId) => {
        const configPath = vehicleConfigs.get(vehicleId);
        if (configPath === undefined) {
          throw new RangeError(`vehicle ${vehicleId} was not provisioned`);
        }
        const signing = readSigningConfig(configPath);
        return {
          tls: readClientConfig(configPath).tls,
          updateSigningKeyPath: signing.updateSigningKeyPath,
          trustedReleaseKeysPath: signing.trustedReleaseKeysPath,
        };
      },
      releaseKeyId,
      remove: () => rmSync(dir, { recursive: true, force: true }),
    };
  } catch (err) {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
}
