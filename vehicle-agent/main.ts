/**
 * Command line of the vehicle agent:
 * `npx tsx vehicle-agent/main.ts run --vehicle-id veh-001 --data DIR`
 * runs the daemon, and
 * `npx tsx vehicle-agent/main.ts classify sign.png --state-dir DIR`
 * prints the top classes of one image, and
 * `npx tsx vehicle-agent/main.ts explain sign.png --out heat.png --state-dir DIR`
 * draws which regions of the image drove its prediction.
 */
import path from 'node:path';
import { Command, InvalidArgumentError, Option } from 'commander';
import { NUM_CLASSES, resolveDataDir } from '../models/index.ts';
import {
  createLogger,
  defaultLogLevel,
  isFleetError,
  parseTags,
  readClientConfig,
  readSigningConfig,
  type ClientTlsFiles,
} from '../protocol/index.ts';
import { reportStartError } from '../protocol/cli-arguments.ts';
import { VehicleAgent } from './agent.ts';
import { classifyImageFile, type ImageClassification } from './classify.ts';
import { OCCLUSION_SCORES, explainImageFile } from './explain.ts';

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

function parseNonNegativeInteger(text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new InvalidArgumentError(`expected an integer >= 0, got ${text}`);
  }
  return value;
}

/** Collects repeated --tag flags; the values are checked by parseTags. */
function collectTag(text: string, previous: string[]): string[] {
  return [...previous, text];
}

function parseSeed(text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value)) {
    throw new InvalidArgumentError(`expected an integer, got ${text}`);
  }
  return value;
}

/** Environment variable that contains the MQTT password for --username. */
const PASSWORD_ENV = 'FLEETLEARN_BROKER_PASSWORD';

interface RunFlags {
  config?: string;
  vehicleId?: string;
  fleetId?: string;
  brokerUrl?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  username?: string;
  updateSigningKey?: string;
  trustedReleaseKeys?: string;
  data?: string;
  dataLimit?: number;
  stateDir?: string;
  backend?: string;
  maxMessageBytes?: number;
  seed: number;
  tag: string[];
  evalFrames?: number;
  reportIntervalMs?: number;
  logLevel: string;
}

/** Connection settings from --config, overridden by single flags. */
interface ConnectionFlags {
  vehicleId: string;
  fleetId: string;
  brokerUrl: string;
  tls: ClientTlsFiles | undefined;
}

function resolveConnectionFlags(flags: RunFlags): ConnectionFlags {
  const config =
    flags.config === undefined ? undefined : readClientConfig(flags.config);
  const vehicleId = flags.vehicleId ?? config?.vehicleId;
  if (vehicleId === undefined) {
    throw new TypeError(
      'give --vehicle-id <id>, or --config with a vehicleId field',
    );
  }
  const tlsFlags = [flags.tlsCa, flags.tlsCert, flags.tlsKey];
  const tlsFlagCount = tlsFlags.filter((flag) => flag !== undefined).length;
  if (tlsFlagCount !== 0 && tlsFlagCount !== 3) {
    throw new TypeError('give all of --tls-ca, --tls-cert and --tls-key');
  }
  const tls =
    tlsFlagCount === 3
      ? {
          caPath: flags.tlsCa!,
          certPath: flags.tlsCert!,
          keyPath: flags.tlsKey!,
        }
      : config?.tls;
  return {
    vehicleId,
    fleetId: flags.fleetId ?? config?.fleetId ?? 'default',
    brokerUrl:
      flags.brokerUrl ??
      config?.brokerUrl ??
      (tls === undefined ? 'mqtt://127.0.0.1:1883' : 'mqtts://127.0.0.1:8883'),
    tls,
  };
}

/** Key files from the flags, else from the --config file. */
function resolveSigningFlags(flags: RunFlags): {
  updateSigningKeyPath?: string;
  trustedReleaseKeysPath?: string;
} {
  const config =
    flags.config === undefined ? {} : readSigningConfig(flags.config);
  return {
    updateSigningKeyPath: flags.updateSigningKey ?? config.updateSigningKeyPath,
    trustedReleaseKeysPath:
      flags.trustedReleaseKeys ?? config.trustedReleaseKeysPath,
  };
}

async function runAgent(flags: RunFlags): Promise<void> {
  const log = createLogger({ level: flags.logLevel, name: 'vehicle-agent' });
  let agent: VehicleAgent;
  try {
    const connection = resolveConnectionFlags(flags);
    agent = new VehicleAgent({
      vehicleId: connection.vehicleId,
      fleetId: connection.fleetId,
      brokerUrl: connection.brokerUrl,
      tls: connection.tls,
      ...resolveSigningFlags(flags),
      username: flags.username,
      password:
        flags.username === undefined ? undefined : process.env[PASSWORD_ENV],
      stateDir:
        flags.stateDir ?? path.join('state', 'vehicles', connection.vehicleId),
      dataDir: resolveDataDir(flags.data),
      dataLimit: flags.dataLimit,
      preferredBackend: flags.backend,
      maxMessageBytes: flags.maxMessageBytes,
      seed: flags.seed,
      tags: parseTags(flags.tag),
      evalFrames: flags.evalFrames,
      reportIntervalMs: flags.reportIntervalMs,
      log,
    });
  } catch (err) {
    process.exitCode = reportStartError(
      'agent',
      err,
      log,
      'invalid agent options',
    );
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
    process.exit(reportStartError('agent', err, log, 'agent failed to start'));
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

/**
 * Runs a command that reads one model, named by exactly one of
 * --state-dir and --model. A FleetError or RangeError from `action` is a
 * user error: one line on stderr and exit code 1.
 */
async function runWithModel(
  flags: { stateDir?: string; model?: string },
  action: () => Promise<void>,
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
    await action();
  } catch (err) {
    if (!isFleetError(err) && !(err instanceof RangeError)) throw err;
    console.error(`error: ${err.message}`);
    process.exitCode = 1;
  }
}

async function classifyCommand(
  image: string,
  flags: { stateDir?: string; model?: string; top: number },
): Promise<void> {
  await runWithModel(flags, async () => {
    const result = await classifyImageFile({
      image,
      stateDir: flags.stateDir,
      modelPath: flags.model,
      top: flags.top,
    });
    printClassification(result);
  });
}

interface ExplainFlags {
  out: string;
  stateDir?: string;
  model?: string;
  patchSize: number;
  stride: number;
  fill: 'mean' | number;
  score: (typeof OCCLUSION_SCORES)[number];
  class?: number;
  top: number;
  scale: number;
}

function parseFill(text: string): 'mean' | number {
  if (text === 'mean') return text;
  const value = text.trim() === '' ? Number.NaN : Number(text);
  if (!(value >= 0 && value <= 1)) {
    throw new InvalidArgumentError(
      `expected mean or a number in [0, 1], got ${text}`,
    );
  }
  return value;
}

function parseClassId(text: string): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 0 || value >= NUM_CLASSES) {
    throw new InvalidArgumentError(
      `expected a class id from 0 to ${NUM_CLASSES - 1}, got ${text}`,
    );
  }
  return value;
}

async function explainCommand(
  image: string,
  flags: ExplainFlags,
): Promise<void> {
  await runWithModel(flags, async () => {
    const result = await explainImageFile({
      image,
      stateDir: flags.stateDir,
      modelPath: flags.model,
      outPath: flags.out,
      patchSize: flags.patchSize,
      stride: flags.stride,
      fill: flags.fill,
      score: flags.score,
      classId: flags.class,
      top: flags.top,
      scale: flags.scale,
    });
    console.log(JSON.stringify(result, null, 2));
  });
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
  .option(
    '--config <file>',
    'agent.json from `provision issue-vehicle`: vehicle id, fleet id, ' +
      'broker URL and TLS files; the flags below override its fields',
  )
  .option(
    '--vehicle-id <id>',
    'vehicle id, one MQTT topic level (required without --config)',
  )
  .option('--fleet-id <id>', 'fleet id, one MQTT topic level (default default)')
  .option(
    '--broker-url <url>',
    'MQTT broker URL (default mqtt://127.0.0.1:1883, or ' +
      'mqtts://127.0.0.1:8883 with TLS files)',
  )
  .option('--tls-ca <file>', 'fleet CA certificate (PEM)')
  .option('--tls-cert <file>', "this vehicle's certificate (PEM)")
  .option(
    '--tls-key <file>',
    "this vehicle's private key (PEM); must have mode 0600",
  )
  .option(
    '--username <name>',
    `MQTT username; the password comes from $${PASSWORD_ENV}`,
  )
  .option(
    '--update-signing-key <file>',
    "this vehicle's Ed25519 private key (PEM, mode 0600) that signs its " +
      'updates; default updateSigningKeyPath of --config, else unsigned',
  )
  .option(
    '--trusted-release-keys <file>',
    "JSON file of the fleet's release keys; with it only signed releases " +
      'are deployed; default trustedReleaseKeysPath of --config',
  )
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
  .option(
    '--tag <key=value>',
    'tag of this vehicle for staged rollouts, for example region=eu; repeat for more',
    collectTag,
    [],
  )
  .option(
    '--eval-frames <count>',
    'frames held out of training to measure on-device accuracy; default 0',
    parseNonNegativeInteger,
  )
  .option(
    '--report-interval-ms <ms>',
    'time between inference reports; 0 reports only after deployments',
    parseNonNegativeInteger,
  )
  .addOption(
    new Option('--log-level <level>', 'pino log level')
      .choices(LOG_LEVELS)
      .default(defaultLogLevel()),
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

program
  .command('explain')
  .description(
    'Write a PNG heat map of the regions of one image that drove its ' +
      'predicted class (occlusion sensitivity), and print the top classes ' +
      'as JSON.',
  )
  .argument('<image>', 'image file (PPM, PNG or JPEG)')
  .requiredOption(
    '--out <file.png>',
    'PNG to write: the image and, beside it, the image under the heat map',
  )
  .option(
    '--state-dir <dir>',
    'use the model the agent deployed in this directory',
  )
  .option('--model <file>', 'use this ONNX model file instead')
  .option(
    '--patch-size <pixels>',
    'side of the square patch that covers the 32x32 model input, 1 to 32',
    parsePositiveInteger,
    8,
  )
  .option(
    '--stride <pixels>',
    'step between patch positions, 1 to the patch size',
    parsePositiveInteger,
    2,
  )
  .option(
    '--fill <value>',
    "colour of a patch: mean (the image's mean colour) or a grey level " +
      'in [0, 1]',
    parseFill,
    'mean',
  )
  .addOption(
    new Option(
      '--score <kind>',
      'what a patch is measured by: the fall of the log-odds or of the ' +
        'probability of the explained class',
    )
      .choices(OCCLUSION_SCORES)
      .default('log-odds'),
  )
  .option(
    '--class <id>',
    'class id to explain; default the predicted class',
    parseClassId,
  )
  .option('--top <count>', 'number of classes to list', parsePositiveInteger, 5)
  .option(
    '--scale <factor>',
    'enlargement of the 32x32 image in the PNG, 1 to 64',
    parsePositiveInteger,
    8,
  )
  .action(explainCommand);

await program.parseAsync();
