import {
  OnnxClassifier,
  OnnxFeatureExtractor,
  evaluateAccuracy,
  exportFeatureExtractor,
  exportOnnx,
  firstTrainableLayer,
  trainLocal,
  type LabelledImages,
  type WeightMap,
} from '../../models/index.ts';
import type { Logger } from '../../protocol/index.ts';

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
): Promise<number> {
  const started = Date.now();
  const fromLayer = firstTrainableLayer(options.trainableTensors);
  const extractor = await OnnxFeatureExtractor.create(
    exportFeatureExtractor(base, fromLayer),
  );
  const features = await extractor.extract(train.images, train.count);
  await extractor.close();

  const result = await trainLocal(base, features, train.labels, {
    trainableTensors: options.trainableTensors,
    epochs: options.epochs,
    batchSize: options.batchSize,
    learningRate: options.learningRate,
    proximalMu: 0,
    seed: options.seed,
    fromLayer,
  });

  const trained: WeightMap = new Map(base);
  for (const [name, delta] of result.deltas) {
    const values = Float32Array.from(base.get(name)!);
    for (let i = 0; i < values.length; i++) values[i] += delta[i];
    trained.set(name, values);
  }
  const classifier = await OnnxClassifier.create(exportOnnx(trained));
  const accuracy = await evaluateAccuracy(classifier, test.images, test.labels);
  await classifier.close();
  log.info(
    { accuracy, epochs: options.epochs, numExamples: train.count, durationMs: Date.now() - started },
    'centralized baseline trained',
  );
  return accuracy;
}
