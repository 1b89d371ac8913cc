/**
 * Trains the base model (version 0) that the fleet starts from.
 *
 * The whole CNN trains on a depot split, a fraction of the GTSRB training
 * tracks chosen by track so that no physical sign is on both sides. The
 * remaining tracks belong to the simulated vehicles. The script then
 * measures the headroom the fleet has: dense1 and dense2 retrained
 * centrally on the vehicles' images, from frozen conv features computed in
 * onnxruntime as the vehicles compute them. It writes the weights, the
 * depot track ids and PROVENANCE.md.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import cliProgress from 'cli-progress';
import { Command } from 'commander';

import {
  DEFAULT_TRAINABLE_LAYERS,
  MODEL_NAME,
  tensorNamesOfLayers,
  type WeightMap,
} from '../models/architecture.ts';
import {
  applyDeltas,
  augmentImages,
  createRandom,
  evaluateAccuracy,
  exportFeatureExtractor,
  exportOnnx,
  initializeWeights,
  loadLabelledImages,
  OnnxClassifier,
  OnnxFeatureExtractor,
  selectTrainingBackend,
  splitByTrack,
  trainLocal,
  writeWeightsFile,
  type LabelledImages,
  type LocalTrainingResult,
  type TrainLocalOptions,
} from '../models/index.ts';
import { createLogger, isFleetError, type Logger } from '../protocol/index.ts';
import {
  parseFraction,
  parseIntegerAtLeast,
  parsePositiveNumber,
} from '../protocol/cli-arguments.ts';
import {
  renderProvenance,
  type BaseModelRun,
} from './base-model-provenance.ts';

const REPOSITORY_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');

interface BaseModelOptions {
  data?: string;
  outDir: string;
  depotFraction: number;
  seed: number;
  epochs: number;
  batchSize: number;
  learningRate: number;
  headEpochs: number;
  headBatchSize: number;
  headLearningRate: number;
  augment: boolean;
}

function parseOptions(argv: string[]): BaseModelOptions {
  const program = new Command('train-base-model')
    .description(
      'Train the base model (version 0) on a depot split of GTSRB tracks ' +
        'and measure how much a dense-head retrain on the other tracks gains.',
    )
    .option(
      '--data <dir>',
      'full GTSRB training set, 32x32 (default: data/gtsrb32-full, then ' +
        '../shared/data/gtsrb32-full, relative to the repository)',
    )
    .option(
      '--out-dir <dir>',
      'where the model files go',
      join(REPOSITORY_ROOT, 'models/base'),
    )
    .option(
      '--depot-fraction <number>',
      'fraction of tracks in the depot split',
      parseFraction,
      0.5,
    )
    .option(
      '--seed <integer>',
      'seed of the split, weights and shuffles',
      parseIntegerAtLeast(0),
      1,
    )
    .option(
      '--epochs <count>',
      'epochs of the full CNN on the depot split',
      parseIntegerAtLeast(1),
      9,
    )
    .option(
      '--batch-size <count>',
      'batch size of the full CNN',
      parseIntegerAtLeast(1),
      64,
    )
    .option(
      '--learning-rate <number>',
      'Adam learning rate of the full CNN',
      parsePositiveNumber,
      0.001,
    )
    .option(
      '--head-epochs <count>',
      'epochs of the dense-head retrain on the vehicle tracks; 0 skips it',
      parseIntegerAtLeast(0),
      10,
    )
    .option(
      '--head-batch-size <count>',
      'batch size of the head retrain',
      parseIntegerAtLeast(1),
      64,
    )
    .option(
      '--head-learning-rate <number>',
      'Adam learning rate of the head retrain',
      parsePositiveNumber,
      0.001,
    );
  program.parse(argv);
  return program.opts<BaseModelOptions>();
}

/** Returns the --data directory, else the first existing default one. */
function resolveFullDataDir(flag: string | undefined): string {
  if (flag !== undefined) return resolve(flag);
  const candidates = [
    join(REPOSITORY_ROOT, 'data/gtsrb32-full'),
    join(REPOSITORY_ROOT, '../shared/data/gtsrb32-full'),
  ];
  const found = candidates.find((dir) => existsSync(dir));
  if (found === undefined) {
    throw new Error(
      `no full GTSRB data in ${candidates.join(' or ')}; pass --data <dir> ` +
        `with the 39,209 GTSRB training images at 32x32`,
    );
  }
  return found;
}

/** Adds `deltas` to `base`, returning new weights. */
/** Trains with a progress bar on stderr. */
async function trainWithProgress(
  base: WeightMap,
  inputs: Float32Array,
  labels: Int32Array,
  options: TrainLocalOptions,
  title: string,
): Promise<LocalTrainingResult> {
  const bar = new cliProgress.SingleBar(
    {
      format: `${title} epoch {epoch}/{epochs} [{bar}] {value}/{total} | {rate}/s | eta {eta_formatted}`,
      etaBuffer: 50,
      // Without a terminal (a log file), print a line every 10 s.
      noTTYOutput: true,
      notTTYSchedule: 10_000,
    },
    cliProgress.Presets.shades_classic,
  );
  const total = labels.length * options.epochs;
  const started = performance.now();
  bar.start(total, 0, { epoch: 1, epochs: options.epochs, rate: 0 });
  try {
    return await trainLocal(base, inputs, labels, {
      ...options,
      onProgress: ({ epoch, examplesDone, numExamples }) => {
        const done = epoch * numExamples + examplesDone;
        const rate = Math.round(done / ((performance.now() - started) / 1000));
        bar.update(done, { epoch: epoch + 1, rate });
      },
    });
  } finally {
    bar.stop();
  }
}

async function measureAccuracy(
  weights: WeightMap,
  test: LabelledImages,
): Promise<number> {
  const classifier = await OnnxClassifier.create(exportOnnx(weights));
  try {
    return await evaluateAccuracy(classifier, test.images, test.labels);
  } finally {
    await classifier.close();
  }
}

async function extractFeatures(
  weights: WeightMap,
  images: LabelledImages,
  beforeLayer: string,
): Promise<Float32Array> {
  const extractor = await OnnxFeatureExtractor.create(
    exportFeatureExtractor(weights, beforeLayer),
  );
  try {
    return await extractor.extract(images.images, images.count);
  } finally {
    await extractor.close();
  }
}

/** Returns a seeded augment hook for trainLocal. */
function createAugmenter(
  seed: number,
): (inputs: Float32Array, count: number) => void {
  const random = createRandom(seed + 1);
  return (inputs, count) => augmentImages(inputs, count, random);
}

/**
 * Trains the full CNN one epoch per trainLocal call, so Adam restarts each
 * epoch and epoch e shuffles with seed `seed + e - 1`. That is the
 * procedure the shipped base came from; it also logs test accuracy after
 * every epoch.
 */
async function trainBase(
  depot: LabelledImages,
  test: LabelledImages,
  options: BaseModelOptions,
  log: Logger,
): Promise<{ weights: WeightMap; result: LocalTrainingResult }> {
  let weights = initializeWeights(options.seed);
  let result: LocalTrainingResult | undefined;
  let durationMs = 0;
  for (let epoch = 1; epoch <= options.epochs; epoch++) {
    const seed = options.seed + epoch - 1;
    result = await trainWithProgress(
      weights,
      depot.images,
      depot.labels,
      {
        trainableTensors: [...weights.keys()],
        epochs: 1,
        batchSize: options.batchSize,
        learningRate: options.learningRate,
        proximalMu: 0,
        seed,
        optimizer: 'adam',
        augment: options.augment ? createAugmenter(seed) : undefined,
      },
      `base ${epoch}/${options.epochs}`,
    );
    weights = applyDeltas(weights, result.deltas);
    durationMs += result.durationMs;
    log.info(
      {
        epoch,
        loss: result.loss,
        trainAccuracy: result.accuracy,
        testAccuracy: await measureAccuracy(weights, test),
        durationMs: Math.round(result.durationMs),
      },
      'base epoch done',
    );
  }
  log.info(
    {
      loss: result!.loss,
      trainAccuracy: result!.accuracy,
      numExamples: result!.numExamples,
      durationMs: Math.round(durationMs),
    },
    'base model trained',
  );
  return { weights, result: { ...result!, durationMs } };
}

/**
 * Retrains the default trainable layers centrally on the vehicles' images,
 * from conv features computed in onnxruntime, and returns test accuracy.
 */
async function measureHeadroom(
  base: WeightMap,
  vehicles: LabelledImages,
  test: LabelledImages,
  options: BaseModelOptions,
  log: Logger,
): Promise<{ accuracy: number; result: LocalTrainingResult }> {
  const fromLayer = DEFAULT_TRAINABLE_LAYERS[0];
  const features = await extractFeatures(base, vehicles, fromLayer);
  const result = await trainWithProgress(
    base,
    features,
    vehicles.labels,
    {
      trainableTensors: tensorNamesOfLayers(DEFAULT_TRAINABLE_LAYERS),
      epochs: options.headEpochs,
      batchSize: options.headBatchSize,
      learningRate: options.headLearningRate,
      proximalMu: 0,
      seed: options.seed,
      fromLayer,
      optimizer: 'adam',
    },
    'head',
  );
  const accuracy = await measureAccuracy(
    applyDeltas(base, result.deltas),
    test,
  );
  log.info(
    {
      accuracy,
      numExamples: result.numExamples,
      durationMs: Math.round(result.durationMs),
    },
    'head retrain measured',
  );
  return { accuracy, result };
}

function writeOutputs(
  run: BaseModelRun,
  weights: WeightMap,
  depot: LabelledImages,
): void {
  mkdirSync(run.outDir, { recursive: true });
  writeWeightsFile(join(run.outDir, 'gtsrb-cnn-v0.weights.pb'), weights, {
    modelName: MODEL_NAME,
    version: 0,
  });
  const depotTracks = [...new Set(depot.tracks)].sort();
  writeFileSync(
    join(run.outDir, 'depot-tracks.json'),
    `${JSON.stringify(depotTracks, null, 2)}\n`,
  );
  writeFileSync(join(run.outDir, 'PROVENANCE.md'), renderProvenance(run));
}

async function main(): Promise<void> {
  const started = Date.now();
  const options = parseOptions(process.argv);
  const log = createLogger().child({ component: 'train-base' });
  const dataDir = resolveFullDataDir(options.data);
  const backend = await selectTrainingBackend(log);

  const train = await loadLabelledImages(dataDir, { split: 'train' });
  const test = await loadLabelledImages(dataDir, { split: 'test' });
  const { selected: depot, rest: vehicles } = splitByTrack(
    train,
    options.depotFraction,
    options.seed,
  );
  log.info(
    {
      dataDir,
      depotImages: depot.count,
      vehicleImages: vehicles.count,
      testImages: test.count,
    },
    'data split by track',
  );

  const base = await trainBase(depot, test, options, log);
  const baseAccuracy = await measureAccuracy(base.weights, test);
  log.info({ accuracy: baseAccuracy }, 'base model evaluated');
  const headroom =
    options.headEpochs > 0
      ? await measureHeadroom(base.weights, vehicles, test, options, log)
      : undefined;

  const run: BaseModelRun = {
    ...options,
    outDir: resolve(options.outDir),
    dataDir: relative(REPOSITORY_ROOT, dataDir) || '.',
    backend,
    depotImages: depot.count,
    depotTracks: new Set(depot.tracks).size,
    vehicleImages: vehicles.count,
    vehicleTracks: new Set(vehicles.tracks).size,
    testImages: test.count,
    base: base.result,
    baseAccuracy,
    head: headroom?.result,
    headAccuracy: headroom?.accuracy,
    commandLine: [
      'npx tsx scripts/train-base-model.ts',
      ...process.argv.slice(2),
    ].join(' '),
    machine: `${cpus().length} x ${cpus()[0]?.model ?? 'unknown CPU'}, ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}`,
    wallTimeMs: Date.now() - started,
    date: new Date().toISOString(),
  };
  writeOutputs(run, base.weights, depot);
  log.info(
    { outDir: run.outDir, durationMs: run.wallTimeMs },
    'base model written',
  );
}

main().catch((err: unknown) => {
  const log = createLogger().child({ component: 'train-base' });
  log.fatal(
    { err, code: isFleetError(err) ? err.code : undefined },
    'base model training failed',
  );
  process.exitCode = 1;
});
