/**
 * `npm run bench` measures, in one run, the aggregation kernel against a
 * copy of the same bytes and against numpy doing Flower's FedAvg
 * arithmetic. It also times protobuf encode and decode of an update, ONNX
 * against TF.js inference on the base model, and one round of a simulated
 * fleet with its bytes on the wire. It prints a table and can write JSON.
 */
import { writeFileSync } from 'node:fs';
import { Command, InvalidArgumentError } from 'commander';
import { describeFileError } from '../models/registry/index.ts';
import { parseIntegerAtLeast } from '../protocol/cli-arguments.ts';
import { isFleetError } from '../protocol/index.ts';
import { benchCodec } from './bench/codec.ts';
import { benchFleetRound } from './bench/fleet-round.ts';
import { benchInference } from './bench/inference.ts';
import { benchKernel } from './bench/kernel.ts';
import { machineFacts } from './bench/machine.ts';
import { benchNumpy, hasNumpy } from './bench/numpy.ts';
import { checkDataDir, checkJsonPath } from './bench/preflight.ts';
import { printReport, type BenchReport } from './bench/report.ts';

/** Sizes of each part: the full run, and --quick for tests. */
const SIZES = {
  full: {
    kernel: { updates: 100, size: 1_000_000, repeats: 3 },
    codec: { iterations: 200, repeats: 3 },
    inference: { images: 512, repeats: 3 },
    vehicles: 50,
  },
  quick: {
    kernel: { updates: 10, size: 100_000, repeats: 2 },
    codec: { iterations: 10, repeats: 1 },
    inference: { images: 32, repeats: 1 },
    vehicles: 3,
  },
};

/** Rejects an empty --json, which would resolve to the working directory. */
function parseJsonPath(text: string): string {
  if (text.trim() === '') {
    throw new InvalidArgumentError('expected a file path, got ""');
  }
  return text;
}

const program = new Command('bench')
  .description(
    'Measure the aggregation kernel, numpy FedAvg, protobuf, inference ' +
      'and a simulated round on this machine.',
  )
  .option('--quick', 'small sizes everywhere, for a test of the command')
  .option(
    '--json <file>',
    'also write the results as JSON to this file',
    parseJsonPath,
  )
  .option(
    '--data <dir>',
    'GTSRB data directory (default: $FLEETLEARN_DATA, then data/gtsrb32-full, ' +
      'data/gtsrb32, ../shared/data/gtsrb32)',
  )
  .option(
    '--vehicles <count>',
    'vehicles in the simulated round (default 50, 3 with --quick)',
    parseIntegerAtLeast(1),
  )
  .option(
    '--seed <integer>',
    'seed of data and splits',
    parseIntegerAtLeast(0),
    1,
  )
  .parse();

const flags = program.opts();

/**
 * Checks the data folder and the JSON path before any measurement. A
 * failure is a bad argument: one line and exit code 1, as commander's
 * own argument errors and the other npm scripts exit.
 */
async function checkArguments(): Promise<string> {
  try {
    if (flags.json !== undefined) checkJsonPath(flags.json);
    return await checkDataDir(flags.data);
  } catch (err) {
    if (!isFleetError(err) && !(err instanceof RangeError)) throw err;
    console.error(`bench: ${err.message}`);
    process.exit(1);
  }
}

const dataDir = await checkArguments();
const sizes = flags.quick ? SIZES.quick : SIZES.full;
const seed: number = flags.seed;
const report: BenchReport = {
  command: ['npm run bench --', ...process.argv.slice(2)].join(' '),
  startedAt: new Date().toISOString(),
  machine: machineFacts(),
  errors: {},
};

/** Runs one part; a failure is recorded and the other parts still run. */
async function part<T>(name: string, run: () => Promise<T> | T) {
  console.error(`bench: ${name}`);
  try {
    return await run();
  } catch (err) {
    report.errors[name] = (err as Error).message;
    console.error(`bench: ${name} failed: ${(err as Error).message}`);
    return undefined;
  }
}

report.kernel = await part('kernel', () =>
  benchKernel({ ...sizes.kernel, seed }),
);
report.numpy = hasNumpy()
  ? await part('numpy', () => benchNumpy({ ...sizes.kernel, seed }))
  : 'numpy not present, skipped';
report.codec = await part('codec', () => benchCodec({ ...sizes.codec, seed }));
report.inference = await part('inference', () =>
  benchInference({ dataDir, ...sizes.inference }),
);
report.fleetRound = await part('fleet round', () =>
  benchFleetRound({
    vehicles: flags.vehicles ?? sizes.vehicles,
    dataDir,
    seed,
  }),
);

printReport(report);
let isWritten = true;
if (flags.json) {
  try {
    writeFileSync(flags.json, JSON.stringify(report, null, 2));
  } catch (err) {
    // The table above keeps the figures of the run.
    console.error(
      `bench: cannot write the JSON report ${flags.json}: ` +
        describeFileError(err),
    );
    isWritten = false;
  }
}
const hasErrors = Object.keys(report.errors).length > 0;
process.exit(hasErrors || !isWritten ? 1 : 0);
