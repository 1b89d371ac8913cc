/**
 * Command line of the depot aggregator:
 * `npx tsx aggregator/depot/main.ts --depot-id depot-a --fleet-id demo
 * --upstream-url mqtt://10.0.0.1:1883 --downstream-url mqtt://127.0.0.1:1884`.
 */
import { Command, InvalidArgumentError, Option } from 'commander';
import {
  DEFAULT_MAX_MESSAGE_BYTES,
  LOG_LEVEL_NAMES,
  createLogger,
  defaultLogLevel,
} from '../../protocol/index.ts';
import {
  parseIntegerAtLeast,
  parseNumberAtLeast,
  reportStartError,
} from '../../protocol/cli-arguments.ts';
import { startOrExit, stopOnSignals } from '../../protocol/cli-lifecycle.ts';
import { Depot } from './depot.ts';
import {
  DEFAULT_FORWARD_MARGIN_MS,
  DEFAULT_PARTIAL_ACK_TIMEOUT_MS,
} from './options.ts';

/**
 * Flags of the fleet aggregator or the agent that a depot would need to
 * honour but does not yet, each with the reason its error gives.
 */
const UNSUPPORTED_FLAGS: ReadonlyArray<[flag: string, reason: string]> = [
  ['--tls-ca <file>', 'TLS to either broker is not supported by the depot yet'],
  [
    '--tls-cert <file>',
    'TLS to either broker is not supported by the depot yet',
  ],
  [
    '--tls-key <file>',
    'TLS to either broker is not supported by the depot yet',
  ],
  [
    '--vehicle-keys <path>',
    'the depot does not check signed updates yet, so the fleet would count ' +
      'updates whose signature nobody verified',
  ],
  [
    '--secure-aggregation',
    'secure aggregation needs each masked update at the fleet aggregator',
  ],
  [
    '--username <name>',
    'broker credentials are not supported by the depot yet',
  ],
];

const program = new Command('depot')
  .description(
    "Relay one fleet to a depot broker, merge its vehicles' updates and " +
      'forward one partial per round to the fleet aggregator.',
  )
  .requiredOption('--depot-id <id>', 'depot id (one MQTT topic level)')
  .option('--fleet-id <id>', 'fleet id (one MQTT topic level)', 'default')
  .option(
    '--upstream-url <url>',
    'plain MQTT URL of the fleet broker',
    'mqtt://127.0.0.1:1883',
  )
  .option(
    '--downstream-url <url>',
    "plain MQTT URL of the depot's own broker, where its vehicles connect",
    'mqtt://127.0.0.1:1884',
  )
  .option(
    '--state-dir <dir>',
    "directory of the open round's journal (default state/depot-<depot id>)",
  )
  .option(
    '--max-examples-per-update <count>',
    'reject updates that claim more training examples than this',
    parseIntegerAtLeast(1),
    1_000_000,
  )
  .option(
    '--max-abs-delta-value <number>',
    'reject updates with a delta value whose magnitude is above this',
    parseNumberAtLeast(0),
    1000,
  )
  .option(
    '--max-message-bytes <bytes>',
    'maximum size of an update and of the partial',
    parseIntegerAtLeast(1024),
    DEFAULT_MAX_MESSAGE_BYTES,
  )
  .option(
    '--forward-margin-ms <ms>',
    "forward the partial at the latest this long before the round's deadline",
    parseIntegerAtLeast(0),
    DEFAULT_FORWARD_MARGIN_MS,
  )
  .option(
    '--partial-ack-timeout-ms <ms>',
    "resend the partial when the fleet's ack has not arrived after this " +
      'long, doubling with jitter up to 30 s',
    parseIntegerAtLeast(1),
    DEFAULT_PARTIAL_ACK_TIMEOUT_MS,
  )
  .addOption(
    new Option('--log-level <level>', 'pino log level')
      .choices([...LOG_LEVEL_NAMES])
      .default(defaultLogLevel()),
  );
for (const [flag] of UNSUPPORTED_FLAGS) {
  program.addOption(new Option(flag).hideHelp());
}
program.addOption(new Option('--aggregation <rule>').hideHelp());

interface Flags {
  depotId: string;
  fleetId: string;
  upstreamUrl: string;
  downstreamUrl: string;
  stateDir?: string;
  maxExamplesPerUpdate: number;
  maxAbsDeltaValue: number;
  maxMessageBytes: number;
  forwardMarginMs: number;
  partialAckTimeoutMs: number;
  logLevel: string;
}

/**
 * Rejects a flag the depot does not support yet, naming the reason.
 *
 * @throws {InvalidArgumentError} for the first such flag given.
 */
function rejectUnsupportedFlags(): void {
  const aggregation = program.getOptionValue('aggregation') as unknown;
  if (aggregation !== undefined && aggregation !== 'fedavg') {
    throw new InvalidArgumentError(
      `--aggregation ${String(aggregation)} is not supported by the depot: ` +
        'robust rules need each update at the fleet aggregator, and a depot ' +
        'merges with fedavg only',
    );
  }
  for (const [flag, reason] of UNSUPPORTED_FLAGS) {
    const option = program.options.find(
      (candidate) => candidate.flags === flag,
    )!;
    if (program.getOptionValue(option.attributeName()) === undefined) continue;
    throw new InvalidArgumentError(
      `${option.long} is not supported by the depot: ${reason}`,
    );
  }
}

async function main(): Promise<void> {
  program.parse();
  const flags = program.opts<Flags>();
  const log = createLogger({ level: flags.logLevel });

  let depot: Depot;
  try {
    rejectUnsupportedFlags();
    depot = new Depot({ ...flags, log });
  } catch (err) {
    process.exit(reportStartError('depot', err, log, 'invalid configuration'));
  }

  const shutdown = stopOnSignals(depot, log);
  let isStarted = false;
  // A failure during start rejects start(), which startOrExit reports, so
  // this handler covers only failures after the start.
  depot.on('failed', (err) => {
    if (!isStarted || shutdown.isStopping) return;
    process.exit(reportStartError('depot', err, log, 'depot stopped'));
  });
  isStarted = await startOrExit('depot', depot, shutdown, log);
}

await main();
