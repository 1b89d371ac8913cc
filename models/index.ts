export { CLASS_NAMES, className } from './class-names.ts';
export {
  createRandom,
  decodeImageFile,
  dirichletSplit,
  loadLabelledImages,
  resolveDataDir,
  splitByTrack,
  subset,
} from './dataset.ts';
export type { LabelledImages, LoadOptions } from './dataset.ts';
export { IMAGE_VALUES } from './image-decode.ts';
export { convertGtsrbArchives } from './gtsrb-convert.ts';
export type { GtsrbArchivePaths } from './gtsrb-convert.ts';
export { encodePpm, parsePpm } from './ppm.ts';
export type { PpmImage } from './ppm.ts';
export { exportFeatureExtractor, exportOnnx } from './onnx-export.ts';
export {
  ONNX_FEATURES_NAME,
  ONNX_INPUT_NAME,
  ONNX_OPSET_VERSION,
  ONNX_OUTPUT_NAME,
} from './onnx-layout.ts';
export { importOnnxWeights } from './onnx-import.ts';
export {
  evaluateAccuracy,
  INFERENCE_BATCH_SIZE,
  OnnxClassifier,
  OnnxFeatureExtractor,
  sha256Hex,
} from './runtime.ts';
export {
  currentTrainingBackend,
  hasConvKernelGradient,
  selectTrainingBackend,
  TRAINING_BACKENDS,
} from './backend.ts';
export type { TrainingBackend } from './backend.ts';
export { firstTrainableLayer, predictTfjs, trainLocal } from './training.ts';
export type {
  LocalOptimizer,
  LocalTrainingOptions,
  LocalTrainingResult,
  TrainingProgress,
  TrainLocalOptions,
} from './training.ts';
export { initializeWeights } from './weight-init.ts';
export {
  readWeightsFile,
  readWeightsFileContents,
  writeWeightsFile,
} from './weights-file.ts';
export type { WeightsFileContents } from './weights-file.ts';
export {
  DEFAULT_TRAINABLE_LAYERS,
  IMAGE_CHANNELS,
  IMAGE_SIZE,
  LAYER_NAMES,
  LAYERS,
  MODEL_NAME,
  NUM_CLASSES,
  TENSOR_SPECS,
  tensorNamesOfLayers,
} from './architecture.ts';
export type {
  ConvLayer,
  DenseLayer,
  Layer,
  TensorSpec,
  WeightMap,
} from './architecture.ts';
export {
  conv2dIm2col,
  forwardFeatures,
  forwardLogits,
  forwardProbabilities,
  maxPool2x2,
  toTensorMap,
} from './forward.ts';
export type { ConvImpl, ForwardOptions, TensorMap } from './forward.ts';
export { augmentImages } from './augment.ts';
export type { AugmentOptions } from './augment.ts';
export { conv2dCustomGrad, forwardBetween } from './forward.ts';
export { applyDeltas } from './weight-math.ts';
