/**
 * Command line of the vehicle agent:
 * `npx tsx vehicle-agent/main.ts run --vehicle-id veh-001 --data DIR`
 * runs the daemon, and
 * `npx tsx vehicle-agent/main.ts classify sign.png --state-dir DIR`
 * prints the top classes of one image.
 */
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { resolveDataDir } from '../models/index.ts';
import { createLogger, isFleetError } from '../protocol/index.ts';
import { VehicleAgent } from './agent.ts';
import { classifyImageFile, type ImageClassification } from './classify.ts';

const LOG_LEVELS = [
  'fatal',
  'error',
  'warn',
  'info',
  'debug',
  'trace',
  'silent',
];
const BACKENDS = ['tensorflow-gpu', 'tensorflow', 'wasm', 'cpu'];

function parsePositiveInteger(text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 1) {
    throw new InvalidArgumentError(`expected a positive integer, got ${text}`);
  }
  return value;
}

function parseSeed(text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value)) {
    throw new InvalidArgumentError(`expected an integer, got ${text}`);
  }
  return value;
}

interface RunFlags {
  vehicleId: string;
  fleetId: string;
  brokerUrl: string;
  data?: string;
  dataLimit?: number;
  stateDir?: string;
  backend?: string;
  maxMessageBytes?: number;
  seed: number;
  logLevel: string;
}

async function runAgent(flags: RunFlags): Promise<void> {
  const log = createLogger({ level: flags.logLevel, name: 'vehicle-agent' });
  let agent: VehicleAgent;
  try {
    agent = new VehicleAgent({
      vehicleId: flags.vehicleId,
      fleetId: flags.fleetId,
      brokerUrl: flags.brokerUrl,
      stateDir:
        flags.stateDir ?? path.join('state', 'vehicles', flags.vehicleId),
      dataDir: resolveDataDir(flags.data),
      dataLimit: flags.dataLimit,
      preferredBackend: flags.backend,
      maxMessageBytes: flags.maxMessageBytes,
      seed: flags.seed,
      log,
    });
  } catch (err) {
    log.fatal({ err }, 'invalid agent options');
    process.exitCode = 1;
    return;
  }

  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'shutting down');
    agent.stop().then(
      () => process.exit(0),
      (err: unknown) => {
        log.error({ err }, 'agent shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => stop('SIGINT'));
  process.on('SIGTERM', () => stop('SIGTERM'));

  try {
    await agent.start();
  } catch (err) {
    log.fatal({ err }, 'agent failed to start');
    process.exit(1);
  }
}

function printClassification(result: ImageClassification): void {
  const model =
    result.modelVersion === undefined
      ? result.modelSource
      : `version ${result.modelVersion} (${result.modelSource})`;
  console.log(`model ${model}`);
  result.top.forEach((score, rank) => {
    const percent = (score.probability * 100).toFixed(2).padStart(6);
    const id = String(score.classId).padStart(2);
    console.log(`${rank + 1}. ${percent}%  ${id}  ${score.name}`);
  });
}

/**
 * Exits with code 0 when the reader of stdout goes away, as in
 * `classify IMG | head -1`, instead of crashing on EPIPE.
 */
function exitQuietlyOnClosedStdout(): void {
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
}

async function classifyCommand(
  image: string,
  flags: { stateDir?: string; model?: string; top: number },
): Promise<void> {
  exitQuietlyOnClosedStdout();
  if ((flags.stateDir === undefined) === (flags.model === undefined)) {
    console.error(
      'error: give exactly one of --state-dir DIR and --model FILE.onnx',
    );
    process.exitCode = 1;
    return;
  }
  try {
    const result = await classifyImageFile({
      image,
      stateDir: flags.stateDir,
      modelPath: flags.model,
      top: flags.top,
    });
    printClassification(result);
  } catch (err) {
    if (!isFleetError(err) && !(err instanceof RangeError)) throw err;
    console.error(`error: ${err.message}`);
    process.exitCode = 1;
  }
}

const program = new Command('vehicle-agent').description(
  'fleetlearn vehicle agent: local training, updates over MQTT, ONNX inference.',
);

program
  .command('run')
  .description(
    'Run the vehicle daemon until SIGINT or SIGTERM. It retries the ' +
      'broker every 2 s until it connects.',
  )
  .requiredOption('--vehicle-id <id>', 'vehicle id, one MQTT topic level')
  .option('--fleet-id <id>', 'fleet id, one MQTT topic level', 'default')
  .option('--broker-url <url>', 'MQTT broker URL', 'mqtt://127.0.0.1:1883')
  .option(
    '--data <dir>',
    'labelled frames (train split); default: FLEETLEARN_DATA, else the ' +
      'first directory that exists of data/gtsrb32-full, data/gtsrb32 and ' +
      '../shared/data/gtsrb32, relative to the repository root',
  )
  .option(
    '--data-limit <count>',
    'use at most this many frames',
    parsePositiveInteger,
  )
  .option(
    '--state-dir <dir>',
    'deployed models and current.json; default state/vehicles/<vehicle-id>',
  )
  .addOption(
    new Option(
      '--backend <name>',
      'training backend to use; default the fastest that loads',
    ).choices(BACKENDS),
  )
  .option(
    '--max-message-bytes <bytes>',
    'largest encoded update to send, in bytes; default 64 MiB',
    parsePositiveInteger,
  )
  .option('--seed <integer>', 'base seed of local training', parseSeed, 0)
  .addOption(
    new Option('--log-level <level>', 'pino log level')
      .choices(LOG_LEVELS)
      .default('info'),
  )
  .action(runAgent);

program
  .command('classify')
  .description('Print the top classes of one image file.')
  .argument('<image>', 'image file (PPM, PNG or JPEG)')
  .option(
    '--state-dir <dir>',
    'use the model the agent deployed in this directory',
  )
  .option('--model <file>', 'use this ONNX model file instead')
  .option(
    '--top <count>',
    'number of classes to print',
    parsePositiveInteger,
    5,
  )
  .action(classifyCommand);

await program.parseAsync();
