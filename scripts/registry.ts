/**
 * Model registry: `npm run registry -- <command>` lists, shows, compares,
 * exports, pins and prunes the model versions in an aggregator's state
 * directory. Run `npm run registry -- --help` for the commands.
 */
import Table from 'cli-table3';
import { Command, InvalidArgumentError } from 'commander';
import { MODEL_NAME } from '../models/architecture.ts';
import {
  ModelRegistry,
  applyPrune,
  checkOnnx,
  compareVersions,
  exportVersion,
  oneLine,
  planPrune,
  type DamagedEntry,
  type OnnxCheck,
  type RegistryEntry,
  type VersionComparison,
} from '../models/registry/index.ts';
import { isFleetError, readPublicKeys } from '../protocol/index.ts';
import { parseIntegerAtLeast } from '../protocol/cli-arguments.ts';

const UNKNOWN = 'unknown';
const parseVersion = parseIntegerAtLeast(0);

interface GlobalFlags {
  stateDir: string;
  modelName: string;
}

/** Rejects an empty --out, which would resolve to the working directory. */
function parseOutDir(text: string): string {
  if (text.trim() === '') {
    throw new InvalidArgumentError('expected a folder path, got ""');
  }
  return text;
}

function openRegistry(command: Command): ModelRegistry {
  const flags = command.optsWithGlobals<GlobalFlags>();
  return ModelRegistry.open(flags.stateDir, flags.modelName);
}

function printJson(value: unknown): void {
  console.log(JSON.stringify(value, null, 2));
}

function known(value: number | string | null, digits?: number): string {
  if (value === null) return UNKNOWN;
  if (typeof value === 'number' && digits !== undefined) {
    return value.toFixed(digits);
  }
  return String(value);
}

function flagsOf(entry: RegistryEntry | DamagedEntry): string {
  const flags = [
    entry.isCurrent ? 'current' : '',
    entry.pin !== null ? 'pinned' : '',
    entry.signature !== null ? 'signed' : '',
  ];
  return flags.filter((flag) => flag !== '').join(' ');
}

function printList(entries: Array<RegistryEntry | DamagedEntry>): void {
  const table = new Table({
    style: { head: [], border: [] },
    head: [
      'version',
      'parent',
      'round',
      'strategy',
      'vehicles',
      'examples',
      'accuracy',
      'p50 ms',
      'p95 ms',
      'created',
      '',
    ],
  });
  for (const entry of entries) {
    const m = entry.manifest;
    if (m === null) {
      const damaged = { colSpan: 9, content: 'damaged, see below' };
      table.push([entry.version, damaged, flagsOf(entry)]);
      continue;
    }
    table.push([
      m.version,
      known(m.parentVersion),
      known(m.round),
      known(m.strategy),
      known(m.numVehicles),
      known(m.numExamples),
      known(m.testAccuracy, 4),
      known(m.latency?.p50Ms ?? null, 3),
      known(m.latency?.p95Ms ?? null, 3),
      known(m.createdAt),
      flagsOf(entry),
    ]);
  }
  console.log(table.toString());
  for (const entry of entries) {
    if (entry.damage !== null) {
      console.log(`v${entry.version} damaged: ${entry.damage}`);
    }
  }
}

function printEntry(
  entry: RegistryEntry,
  verified: string,
  onnx: OnnxCheck,
): void {
  const m = entry.manifest;
  const params =
    m.strategyParams === null || Object.keys(m.strategyParams).length === 0
      ? ''
      : ` ${JSON.stringify(m.strategyParams)}`;
  const latency =
    m.latency === null
      ? UNKNOWN
      : `p50 ${m.latency.p50Ms} ms, p95 ${m.latency.p95Ms} ms over ` +
        `${m.latency.runs} one-image runs on ${m.latency.imageCount} ` +
        `${m.latency.imageSource} images`;
  const signature =
    entry.signature === null
      ? 'none kept'
      : `key ${entry.signature.keyId}, release sequence ` +
        `${entry.signature.releaseSequence}, ${verified}`;
  const lines: Array<[string, string]> = [
    ['model', known(m.modelName)],
    ['version', `${m.version}${entry.isCurrent ? ' (current)' : ''}`],
    ['parent version', known(m.parentVersion)],
    ['round', known(m.round)],
    ['strategy', `${known(m.strategy)}${params}`],
    ['vehicles', known(m.numVehicles)],
    ['examples', known(m.numExamples)],
    ['test accuracy', known(m.testAccuracy, 4)],
    ['latency', latency],
    ['sha256', m.sha256],
    ['size', `${known(m.sizeBytes)} bytes`],
    [
      'onnx file',
      onnx.problem === null
        ? 'matches the manifest SHA-256'
        : `damaged: ${onnx.problem}`,
    ],
    ['created', known(m.createdAt)],
    ['trained tensors', m.trainableTensors?.join(', ') || 'none'],
    ['pinned', entry.pin === null ? 'no' : `yes: ${entry.pin.reason}`],
    ['signature', signature],
  ];
  for (const [key, value] of lines) {
    console.log(`${key.padEnd(16)} ${value}`);
  }
  for (const file of entry.files) {
    console.log(`${'file'.padEnd(16)} ${file.path} (${file.bytes} bytes)`);
  }
}

/** Formats a manifest value for the comparison table. */
function formatField(value: unknown): string {
  if (value === null) return UNKNOWN;
  if (typeof value === 'string') return value;
  const latency = value as { p50Ms?: unknown; p95Ms?: unknown };
  if (typeof latency.p50Ms === 'number') {
    return `p50 ${latency.p50Ms} ms, p95 ${String(latency.p95Ms)} ms`;
  }
  return JSON.stringify(value);
}

function signed(value: number | null, digits: number, unit = ''): string {
  if (value === null) return UNKNOWN;
  return `${value >= 0 ? '+' : ''}${value.toFixed(digits)}${unit}`;
}

function printComparison(result: VersionComparison): void {
  const hidden =
    result.relation === 'unknown'
      ? ' (a damaged manifest cuts the lineage short)'
      : '';
  console.log(
    `versions ${result.a} -> ${result.b}: ${result.relation}${hidden}`,
  );
  const fields = new Table({
    style: { head: [], border: [] },
    head: ['field', `v${result.a}`, `v${result.b}`],
  });
  for (const diff of result.fields) {
    fields.push([diff.field, formatField(diff.a), formatField(diff.b)]);
  }
  console.log(
    result.fields.length === 0 ? 'manifests equal' : fields.toString(),
  );

  const tensors = new Table({
    style: { head: [], border: [] },
    head: ['tensor', 'L2 change', 'relative', 'max |change|'],
  });
  for (const t of result.tensors) {
    tensors.push([
      t.name,
      t.l2Norm.toExponential(3),
      t.relativeChange === null ? UNKNOWN : t.relativeChange.toExponential(3),
      t.maxAbsChange.toExponential(3),
    ]);
  }
  console.log(tensors.toString());
  console.log(`total L2 change  ${result.totalL2Norm.toExponential(3)}`);
  console.log(`accuracy         ${signed(result.accuracyDelta, 4)}`);
  console.log(`latency p50      ${signed(result.latencyP50DeltaMs, 3, ' ms')}`);
  console.log(`latency p95      ${signed(result.latencyP95DeltaMs, 3, ' ms')}`);
}

const program = new Command('registry')
  .description('List, compare, export and prune stored model versions.')
  .option(
    '--state-dir <dir>',
    "the aggregator's state directory, which holds the model store",
    'state/aggregator',
  )
  .option('--model-name <name>', 'model whose versions to manage', MODEL_NAME);

program
  .command('list')
  .description('List every stored version, oldest first.')
  .option('--json', 'print JSON instead of a table')
  .action((flags: { json?: boolean }, command: Command) => {
    const entries = openRegistry(command).list();
    if (flags.json === true) printJson(entries);
    else printList(entries);
  });

program
  .command('show')
  .description('Print the manifest, files, pin and signature of a version.')
  .argument('<version>', 'model version', parseVersion)
  .option(
    '--trusted-keys <file>',
    "JSON file of the fleet's release keys; with it the kept signed " +
      'notice is verified',
  )
  .option('--json', 'print JSON')
  .action(
    (
      version: number,
      flags: { trustedKeys?: string; json?: boolean },
      command: Command,
    ) => {
      const registry = openRegistry(command);
      const entry = registry.entry(version);
      let verified = 'not verified (no --trusted-keys)';
      if (flags.trustedKeys !== undefined && entry.signature !== null) {
        registry.verifySignature(version, readPublicKeys(flags.trustedKeys));
        verified = 'verified';
      }
      const onnx = checkOnnx(registry, version);
      if (flags.json === true) printJson({ ...entry, verified, onnx });
      else printEntry(entry, verified, onnx);
      if (onnx.problem !== null) {
        console.error(`error: ${onnx.problem}`);
        process.exitCode = 1;
      }
    },
  );

program
  .command('compare')
  .description(
    'Compare two versions: manifest differences, per-tensor weight ' +
      'changes (B - A) and accuracy and latency deltas.',
  )
  .argument('<a>', 'model version A', parseVersion)
  .argument('<b>', 'model version B', parseVersion)
  .option('--json', 'print JSON')
  .action(
    (a: number, b: number, flags: { json?: boolean }, command: Command) => {
      const result = compareVersions(openRegistry(command), a, b);
      if (flags.json === true) printJson(result);
      else printComparison(result);
    },
  );

program
  .command('export')
  .description(
    'Write the ONNX file, manifest, kept signed notice and SHA256SUMS of ' +
      'a version to a new folder.',
  )
  .argument('<version>', 'model version', parseVersion)
  .requiredOption(
    '--out <dir>',
    'folder to create; must not exist',
    parseOutDir,
  )
  .action((version: number, flags: { out: string }, command: Command) => {
    const exported = exportVersion(openRegistry(command), version, flags.out);
    console.log(`exported model version ${version} to ${exported.dir}`);
    for (const file of exported.files) console.log(`  ${file}`);
    if (!exported.signed) console.log('  (no signed release notice kept)');
  });

program
  .command('prune')
  .description(
    'Delete old versions. Kept: the current version and its nearest ' +
      'ancestors (--keep in all), version 0, pinned versions, the ' +
      'releases the broker may retain, and versions still being committed.',
  )
  .requiredOption(
    '--keep <count>',
    'versions of the current lineage to keep, the current one included',
    parseIntegerAtLeast(1),
  )
  .option('--dry-run', 'print what would be deleted, and delete nothing')
  .action((flags: { keep: number; dryRun?: boolean }, command: Command) => {
    const registry = openRegistry(command);
    const plan = planPrune(registry, flags.keep);
    for (const { version, reasons } of plan.keep) {
      console.log(`keep    v${version} (${reasons.join(', ')})`);
    }
    for (const { version, damage } of plan.damaged) {
      console.log(`damaged v${version}: ${damage}`);
    }
    if (flags.dryRun === true) {
      for (const version of plan.remove)
        console.log(`would delete v${version}`);
      return;
    }
    const removed = applyPrune(registry, plan);
    let bytes = 0;
    for (const version of removed) {
      console.log(
        `deleted v${version.version} (${version.files.length} files)`,
      );
      bytes += version.bytes;
    }
    console.log(`deleted ${removed.length} versions, ${bytes} bytes`);
  });

program
  .command('pin')
  .description('Keep a version whatever prune --keep says.')
  .argument('<version>', 'model version', parseVersion)
  .option('--reason <text>', 'why it is kept', 'pinned by operator')
  .action((version: number, flags: { reason: string }, command: Command) => {
    openRegistry(command).pin(version, flags.reason);
    console.log(`pinned model version ${version}: ${flags.reason}`);
  });

program
  .command('unpin')
  .description('Remove the pin of a version.')
  .argument('<version>', 'model version', parseVersion)
  .action((version: number, _flags: unknown, command: Command) => {
    openRegistry(command).unpin(version);
    console.log(`unpinned model version ${version}`);
  });

/**
 * Returns true for errors the command reports as one line: its own
 * checks, and file system errors (which carry a syscall) that no check
 * above turned into a FleetError.
 */
function isUserError(err: unknown): err is Error {
  const isFileError =
    err instanceof Error &&
    typeof (err as NodeJS.ErrnoException).syscall === 'string';
  return isFleetError(err) || err instanceof RangeError || isFileError;
}

try {
  await program.parseAsync();
} catch (err) {
  if (!isUserError(err)) throw err;
  console.error(`error: ${oneLine(err.message)}`);
  process.exitCode = 1;
}
