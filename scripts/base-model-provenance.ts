import type { LocalTrainingResult } from '../models/index.ts';

/** Everything PROVENANCE.md records about one base-model run. */
export interface BaseModelRun {
  dataDir: string;
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
  backend: string;
  depotImages: number;
  depotTracks: number;
  vehicleImages: number;
  vehicleTracks: number;
  testImages: number;
  base: LocalTrainingResult;
  baseAccuracy: number;
  head?: LocalTrainingResult;
  headAccuracy?: number;
  commandLine: string;
  machine: string;
  wallTimeMs: number;
  date: string;
}

function percent(value: number): string {
  return `${(value * 100).toFixed(2)}%`;
}

function rate(result: LocalTrainingResult, epochs: number): string {
  const perSecond = (result.numExamples * epochs) / (result.durationMs / 1000);
  return `${Math.round(perSecond).toLocaleString('en-US')} examples/s`;
}

function minutes(ms: number): string {
  return `${(ms / 60_000).toFixed(1)} min`;
}

function renderHead(run: BaseModelRun): string[] {
  if (run.head === undefined || run.headAccuracy === undefined) {
    return ['Not measured in this run (`--head-epochs 0`).'];
  }
  const gain = (run.headAccuracy - run.baseAccuracy) * 100;
  return [
    'dense1 and dense2 retrained centrally on all vehicle-track images,',
    'starting from this base model, with conv3 features computed by the',
    'exported ONNX feature extractor in onnxruntime (as vehicles do):',
    '',
    `- epochs ${run.headEpochs}, batch ${run.headBatchSize}, Adam learning rate ` +
      `${run.headLearningRate}, shuffle seed ${run.seed}`,
    `- test accuracy: **${percent(run.headAccuracy)}**, ${gain.toFixed(1)} points ` +
      `above the base model`,
    `- last-epoch training loss ${run.head.loss.toFixed(4)}, training accuracy ` +
      `${percent(run.head.accuracy)}`,
    `- ${minutes(run.head.durationMs)} on ${run.backend} (${rate(run.head, run.headEpochs)})`,
  ];
}

/** Renders PROVENANCE.md for the files of one run. */
export function renderProvenance(run: BaseModelRun): string {
  const lines = [
    '# Base model gtsrb-cnn version 0: provenance',
    '',
    'Files: `gtsrb-cnn-v0.weights.pb` (protobuf `fleetlearn.v1.ModelWeights`,',
    'read with `readWeightsFile`) and `depot-tracks.json` (sorted track ids',
    'of the depot split, which the simulator keeps away from the vehicles).',
    'Written by `scripts/train-base-model.ts`; rerun the command below to',
    'reproduce them.',
    '',
    '## Data',
    '',
    '- German Traffic Sign Recognition Benchmark (GTSRB), J. Stallkamp et al.,',
    '  "Man vs. computer: Benchmarking machine learning algorithms for traffic',
    '  sign recognition", Neural Networks 32 (2012). All 39,209 official',
    '  training images resized to 32x32, and a class-balanced set of the',
    '  official test images (50 per class).',
    `- Directory: \`${run.dataDir}\` (relative to the repository).`,
    `- Depot split: \`splitByTrack(train, ${run.depotFraction}, ${run.seed})\`, ` +
      'whole physical sign tracks, stratified by class (each class gives',
    '  round(fraction x its tracks) tracks, chosen by a seeded shuffle).',
    `- Depot: ${run.depotImages.toLocaleString('en-US')} images from ` +
      `${run.depotTracks} tracks. Vehicles: ` +
      `${run.vehicleImages.toLocaleString('en-US')} images from ${run.vehicleTracks} ` +
      `tracks. Test: ${run.testImages.toLocaleString('en-US')} images.`,
    '',
    '## Training',
    '',
    '- Whole CNN (conv1-conv3, dense1, dense2) from He/Glorot-uniform',
    `  weights (\`initializeWeights(${run.seed})\`), softmax cross-entropy.`,
    `- Adam, learning rate ${run.learningRate}, batch ${run.batchSize}, ` +
      `${run.epochs} epochs, one trainLocal call per epoch: Adam restarts ` +
      `each epoch, and epoch e shuffles with seed ${run.seed} + e - 1.`,
    run.augment
      ? '- Augmentation (`augmentImages`, seed + 1): per image a random shift of ' +
        'up to 2 pixels (edges repeated), brightness and contrast factors in ' +
        '[0.6, 1.4], clipped to [0, 1]; no flips.'
      : '- No augmentation.',
    `- Backend: ${run.backend}, convolutions with the "custom-grad" gradient.`,
    `- Last-epoch training loss ${run.base.loss.toFixed(4)}, training accuracy ` +
      `${percent(run.base.accuracy)}; ${minutes(run.base.durationMs)} ` +
      `(${rate(run.base, run.epochs)}).`,
    '',
    '## Results',
    '',
    `- Base model test accuracy (onnxruntime, ${run.testImages} images): ` +
      `**${percent(run.baseAccuracy)}**.`,
    '',
    '### Head-retrain headroom',
    '',
    ...renderHead(run),
    '',
    '## Run',
    '',
    '```',
    run.commandLine,
    '```',
    '',
    `- Machine: ${run.machine}`,
    `- Wall time: ${minutes(run.wallTimeMs)}, including data loading and evaluation`,
    `- Date: ${run.date}`,
    '',
  ];
  return lines.join('\n');
}
