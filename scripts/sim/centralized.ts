import {
  applyDeltas,
  OnnxClassifier,
  OnnxFeatureExtractor,
  evaluateAccuracy,
  exportFeatureExtractor,
  exportOnnx,
  firstTrainableLayer,
  trainLocal,
  type LabelledImages,
  type TrainingProgress,
  type WeightMap,
} from '../../models/index.ts';
import cliProgress from 'cli-progress';
import type { Logger } from '../../protocol/index.ts';

/**
 * Creates an onProgress callback for trainLocal: a bar on a terminal,
 * otherwise a line on stderr after each epoch. `stop` ends the bar.
 */
function createProgress(
  epochs: number,
  numExamples: number,
  interactive: boolean,
): { onProgress: (progress: TrainingProgress) => void; stop: () => void } {
  const total = epochs * numExamples;
  let bar: cliProgress.SingleBar | undefined;
  if (interactive) {
    bar = new cliProgress.SingleBar(
      {
        format:
          'centralized baseline |{bar}| epoch {epoch}/' +
          epochs +
          ' {percentage}%',
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(total, 0, { epoch: 1 });
  }
  let lastEpochReported = -1;
  const onProgress = ({ epoch, examplesDone }: TrainingProgress): void => {
    bar?.update(epoch * numExamples + examplesDone, { epoch: epoch + 1 });
    if (
      bar === undefined &&
      examplesDone === numExamples &&
      epoch > lastEpochReported
    ) {
      lastEpochReported = epoch;
      console.error(`centralized baseline: epoch ${epoch + 1}/${epochs} done`);
    }
  };
  return { onProgress, stop: () => bar?.stop() };
}

export interface CentralizedOptions {
  trainableTensors: string[];
  epochs: number;
  batchSize: number;
  learningRate: number;
  seed: number;
}

/**
 * Trains the same trainable layers centrally on the union of the vehicles'
 * images for the same number of epochs the federation ran, and returns the
 * test accuracy of the result measured with onnxruntime.
 */
export async function trainCentralized(
  base: WeightMap,
  train: LabelledImages,
  test: LabelledImages,
  options: CentralizedOptions,
  log: Logger,
  interactive: boolean,
): Promise<number> {
  const started = Date.now();
  const fromLayer = firstTrainableLayer(options.trainableTensors);
  const extractor = await OnnxFeatureExtractor.create(
    exportFeatureExtractor(base, fromLayer),
  );
  const features = await extractor.extract(train.images, train.count);
  await extractor.close();

  const progress = createProgress(options.epochs, train.count, interactive);
  const result = await trainLocal(base, features, train.labels, {
    trainableTensors: options.trainableTensors,
    epochs: options.epochs,
    batchSize: options.batchSize,
    learningRate: options.learningRate,
    proximalMu: 0,
    seed: options.seed,
    fromLayer,
    onProgress: progress.onProgress,
  });
  progress.stop();

  const trained = applyDeltas(base, result.deltas);
  const classifier = await OnnxClassifier.create(exportOnnx(trained));
  const accuracy = await evaluateAccuracy(classifier, test.images, test.labels);
  await classifier.close();
  log.info(
    {
      accuracy,
      epochs: options.epochs,
      numExamples: train.count,
      durationMs: Date.now() - started,
    },
    'centralized baseline trained',
  );
  return accuracy;
}
