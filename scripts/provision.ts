/**
 * Fleet provisioning: `npm run provision -- <command>`. Creates the fleet
 * CA, issues broker, aggregator and vehicle certificates with their client
 * configurations, creates and rotates the Ed25519 release-signing keys
 * and the vehicles' update-signing keys, revokes certificates, and adds
 * development password users. Run `npm run provision -- --help` for the
 * commands.
 */
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { createPasswordUser, saveUser } from '../broker/index.ts';
import { isFleetError, type FleetIdentity } from '../protocol/index.ts';
import { parseIntegerAtLeast } from '../protocol/cli-arguments.ts';
import {
  REVOCATION_REASONS,
  activateReleaseKey,
  authorityPaths,
  initReleaseSigning,
  readReleaseKeyList,
  releaseKeyPath,
  removeVehicleKey,
  retireReleaseKey,
  rotateReleaseKey,
  signingPaths,
  initAuthority,
  issueAggregator,
  issueBroker,
  issueVehicle,
  loadAuthority,
  revokeCertificates,
  writeCrl,
  type IssuedFiles,
  type RevocationReason,
  type RevocationTarget,
} from './provision/index.ts';
import { readPassword } from './provision/password-input.ts';

const DEFAULT_BROKER_URL = 'mqtts://127.0.0.1:8883';

function printIssued(what: string, files: IssuedFiles): void {
  console.log(`issued ${what} certificate, serial ${files.serial}`);
  console.log(`  certificate  ${files.certificatePath}`);
  console.log(`  private key  ${files.privateKeyPath} (mode 0600)`);
  console.log(`  CA copy      ${files.caPath}`);
  if (files.updateSigningKeyPath !== undefined) {
    console.log(
      `  update key   ${files.updateSigningKeyPath} (mode 0600, key id ` +
        `${files.updateKeyId})`,
    );
  }
  if (files.configPath !== undefined) {
    console.log(`  config       ${files.configPath}`);
  }
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

function parseRole(text: string): FleetIdentity['role'] {
  if (text !== 'vehicle' && text !== 'aggregator') {
    throw new InvalidArgumentError('expected vehicle or aggregator');
  }
  return text;
}

/** Reads the fleet id of the CA in `dir`, for add-user without --fleet-id. */
function fleetIdOfFolder(dir: string): string | undefined {
  const file = authorityPaths(dir).state;
  if (!existsSync(file)) return undefined;
  return (JSON.parse(readFileSync(file, 'utf8')) as { fleetId: string })
    .fleetId;
}

function printReleaseKey(what: string, dir: string, keyId: string): void {
  console.log(`${what} ${keyId}`);
  console.log(`  private key  ${releaseKeyPath(dir, keyId)} (mode 0600)`);
  console.log(`  trusted list ${signingPaths(dir).releaseKeyList}`);
}

const program = new Command('provision')
  .description(
    'Create the fleet certificate authority and issue, revoke and list ' +
      'certificates for the broker, the aggregator and vehicles.',
  )
  .option('--dir <folder>', 'provisioning folder', path.join('state', 'pki'));

const dirOf = (command: Command): string =>
  command.optsWithGlobals<{ dir: string }>().dir;

program
  .command('init-ca')
  .description('Create the fleet CA (key mode 0600) and an empty CRL.')
  .option('--fleet-id <id>', 'fleet id, one MQTT topic level', 'default')
  .option(
    '--days <days>',
    'validity of the CA certificate in days',
    parseIntegerAtLeast(1),
    3650,
  )
  .option(
    '--crl-days <days>',
    'days until a CRL expires; re-sign with the crl command before then',
    parseIntegerAtLeast(1),
    90,
  )
  .action(async (flags, command: Command) => {
    const dir = dirOf(command);
    await initAuthority(dir, {
      fleetId: flags.fleetId,
      validityDays: flags.days,
      crlDays: flags.crlDays,
    });
    const paths = authorityPaths(dir);
    console.log(`created CA of fleet ${flags.fleetId}`);
    console.log(`  certificate  ${paths.certificate}`);
    console.log(`  private key  ${paths.privateKey} (mode 0600)`);
    console.log(`  CRL          ${paths.crl}`);
    printReleaseKey(
      'created release-signing key',
      dir,
      initReleaseSigning(dir),
    );
  });

program
  .command('init-signing')
  .description(
    'Create the fleet release-signing key (Ed25519, mode 0600) in a ' +
      'folder whose CA was made before signing existed.',
  )
  .action((_flags, command: Command) => {
    const dir = dirOf(command);
    printReleaseKey(
      'created release-signing key',
      dir,
      initReleaseSigning(dir),
    );
  });

program
  .command('rotate-release-key')
  .description(
    'Step 1 of a key rotation: add a new release key to the trusted list ' +
      'and to every vehicle folder. The aggregator keeps the old key.',
  )
  .action((_flags, command: Command) => {
    const dir = dirOf(command);
    printReleaseKey('added release-signing key', dir, rotateReleaseKey(dir));
    console.log(
      'next: copy trusted-release-keys.json to every vehicle and restart ' +
        'its agent, then run activate-release-key',
    );
  });

program
  .command('activate-release-key')
  .description(
    'Step 2: make the aggregator sign with this key (rewrites ' +
      'aggregator.json); restart the aggregator afterwards.',
  )
  .requiredOption('--key-id <id>', 'key id from rotate-release-key or list')
  .action((flags, command: Command) => {
    activateReleaseKey(dirOf(command), flags.keyId);
    console.log(`release key ${flags.keyId} is active; restart the aggregator`);
  });

program
  .command('retire-release-key')
  .description(
    'Step 3: remove an old release key from the trusted list and every ' +
      'vehicle folder, and delete its private key.',
  )
  .requiredOption('--key-id <id>', 'key id of the old key')
  .action((flags, command: Command) => {
    retireReleaseKey(dirOf(command), flags.keyId);
    console.log(
      `release key ${flags.keyId} retired; copy trusted-release-keys.json ` +
        'to every vehicle again',
    );
  });

program
  .command('issue-broker')
  .description("Issue the broker's TLS server certificate.")
  .option(
    '--host <address>',
    'IP address or DNS name clients connect to; repeat for several ' +
      '(default 127.0.0.1 and localhost)',
    collect,
  )
  .option('--days <days>', 'validity in days', parseIntegerAtLeast(1), 365)
  .action(async (flags, command: Command) => {
    const authority = await loadAuthority(dirOf(command));
    const hosts: string[] = flags.host ?? ['127.0.0.1', 'localhost'];
    const files = await issueBroker(authority, {
      hosts,
      validityDays: flags.days,
    });
    printIssued(`broker (${hosts.join(', ')})`, files);
  });

program
  .command('issue-aggregator')
  .description("Issue the aggregator's client certificate and aggregator.json.")
  .option('--broker-url <url>', 'broker URL to write', DEFAULT_BROKER_URL)
  .option('--days <days>', 'validity in days', parseIntegerAtLeast(1), 365)
  .action(async (flags, command: Command) => {
    const authority = await loadAuthority(dirOf(command));
    const files = await issueAggregator(authority, {
      brokerUrl: flags.brokerUrl,
      validityDays: flags.days,
    });
    printIssued('aggregator', files);
  });

program
  .command('issue-vehicle')
  .description(
    "Issue a vehicle's client certificate and the agent's agent.json.",
  )
  .requiredOption('--id <vehicleId>', 'vehicle id, one MQTT topic level')
  .option('--broker-url <url>', 'broker URL to write', DEFAULT_BROKER_URL)
  .option('--days <days>', 'validity in days', parseIntegerAtLeast(1), 365)
  .action(async (flags, command: Command) => {
    const authority = await loadAuthority(dirOf(command));
    const files = await issueVehicle(authority, {
      vehicleId: flags.id,
      brokerUrl: flags.brokerUrl,
      validityDays: flags.days,
    });
    printIssued(`vehicle ${flags.id}`, files);
  });

program
  .command('revoke')
  .description(
    'Revoke certificates and re-sign the CRL. The broker applies it on ' +
      'restart or SIGHUP.',
  )
  .option('--id <vehicleId>', 'revoke every live certificate of a vehicle')
  .option('--aggregator', "revoke the aggregator's certificates")
  .option('--serial <hex>', 'revoke one certificate by serial number')
  .addOption(
    new Option('--reason <reason>', 'CRL reason code')
      .choices([...REVOCATION_REASONS])
      .default('unspecified'),
  )
  .action(async (flags, command: Command) => {
    const targets: RevocationTarget[] = [];
    if (flags.id !== undefined) targets.push({ vehicleId: flags.id });
    if (flags.aggregator === true) targets.push({ role: 'aggregator' });
    if (flags.serial !== undefined) targets.push({ serial: flags.serial });
    if (targets.length !== 1) {
      throw new RangeError(
        'give exactly one of --id <vehicleId>, --aggregator and --serial <hex>',
      );
    }
    const authority = await loadAuthority(dirOf(command));
    const revoked = await revokeCertificates(
      authority,
      targets[0],
      flags.reason as RevocationReason,
    );
    for (const entry of revoked) {
      console.log(
        `revoked ${entry.role} ${entry.name}, serial ${entry.serial}`,
      );
    }
    console.log(`wrote ${authorityPaths(authority.dir).crl}`);
    if (flags.id !== undefined && removeVehicleKey(authority.dir, flags.id)) {
      console.log(
        `removed the update key of vehicle ${flags.id}; restart the ` +
          'aggregator to stop taking its updates',
      );
    }
  });

program
  .command('crl')
  .description('Re-sign the CRL with a new expiry (run before it expires).')
  .action(async (_flags, command: Command) => {
    const authority = await loadAuthority(dirOf(command));
    const file = await writeCrl(authority);
    console.log(
      `wrote ${file}, CRL number ${authority.state.crlNumber}, valid ` +
        `${authority.state.crlDays} days`,
    );
  });

program
  .command('list')
  .description('List issued certificates.')
  .action(async (_flags, command: Command) => {
    const authority = await loadAuthority(dirOf(command));
    console.log(`fleet ${authority.state.fleetId}`);
    const keys = readReleaseKeyList(authority.dir);
    for (const entry of keys?.keys ?? []) {
      const active = entry.keyId === keys?.activeKeyId ? ' (active)' : '';
      console.log(`release key ${entry.keyId}${active}`);
    }
    for (const entry of authority.state.certificates) {
      const status = entry.revokedAt === undefined ? 'valid until' : 'revoked';
      const when = entry.revokedAt ?? entry.notAfter;
      console.log(
        `${entry.serial}  ${entry.role.padEnd(10)} ${entry.name.padEnd(16)} ` +
          `${status} ${when}`,
      );
    }
  });

program
  .command('add-user')
  .description(
    'Add or replace a development username and password identity in the ' +
      "broker's users file. The password is read from standard input.",
  )
  .requiredOption('--users <file>', 'users file (created when missing)')
  .requiredOption('--username <name>', 'MQTT username')
  .requiredOption('--role <role>', 'vehicle or aggregator', parseRole)
  .option('--id <vehicleId>', 'vehicle id, for the vehicle role')
  .option('--fleet-id <id>', "fleet id; default the CA's, else default")
  .action(async (flags, command: Command) => {
    const fleetId =
      flags.fleetId ?? fleetIdOfFolder(dirOf(command)) ?? 'default';
    if ((flags.role === 'vehicle') !== (flags.id !== undefined)) {
      throw new RangeError('give --id <vehicleId> with --role vehicle only');
    }
    const identity: FleetIdentity = {
      role: flags.role,
      fleetId,
      vehicleId: flags.id,
    };
    const password = await readPassword(`password for ${flags.username}: `);
    const user = await createPasswordUser(flags.username, password, identity);
    saveUser(flags.users, user);
    console.log(
      `saved user ${flags.username} (${flags.role}, fleet ${fleetId}) to ` +
        `${flags.users}; connect with client id ` +
        (flags.role === 'vehicle'
          ? `vehicle-${flags.id}`
          : `aggregator-${fleetId}`),
    );
  });

try {
  await program.parseAsync();
} catch (err) {
  if (!isFleetError(err) && !(err instanceof RangeError)) throw err;
  console.error(`error: ${err.message}`);
  process.exitCode = 1;
}
