/**
 * The perception model: a small CNN that classifies 32x32 RGB traffic-sign
 * crops into the 43 GTSRB classes. Weights live in a flat map from tensor
 * name to values, so that the training code, the ONNX exporter and the
 * aggregator all agree on one naming without a framework object.
 *
 * Layout is NHWC (TF.js order): input [N, 32, 32, 3] with pixel values
 * scaled to [0, 1]. Convolution kernels are [kh, kw, in, out] and dense
 * kernels [in, out], as in TF.js.
 */

export const MODEL_NAME = 'gtsrb-cnn';
export const IMAGE_SIZE = 32;
export const IMAGE_CHANNELS = 3;
export const NUM_CLASSES = 43;

export interface ConvLayer {
  kind: 'conv';
  name: string;
  inChannels: number;
  outChannels: number;
  /** Square kernel side; padding is "same", stride 1. */
  kernelSize: number;
  /** Followed by ReLU and a 2x2 max pool with stride 2. */
}

export interface DenseLayer {
  kind: 'dense';
  name: string;
  inUnits: number;
  outUnits: number;
  /** ReLU after the layer; the last layer has none (logits). */
  relu: boolean;
}

export type Layer = ConvLayer | DenseLayer;

/**
 * Layers in order. Between conv3 and dense1 the [N, 4, 4, 64] activation
 * is flattened in NHWC order to 1,024 features.
 */
export const LAYERS: readonly Layer[] = [
  {
    kind: 'conv',
    name: 'conv1',
    inChannels: 3,
    outChannels: 16,
    kernelSize: 3,
  },
  {
    kind: 'conv',
    name: 'conv2',
    inChannels: 16,
    outChannels: 32,
    kernelSize: 3,
  },
  {
    kind: 'conv',
    name: 'conv3',
    inChannels: 32,
    outChannels: 64,
    kernelSize: 3,
  },
  { kind: 'dense', name: 'dense1', inUnits: 1024, outUnits: 128, relu: true },
  {
    kind: 'dense',
    name: 'dense2',
    inUnits: 128,
    outUnits: NUM_CLASSES,
    relu: false,
  },
];

/** Name and shape of one weight tensor. */
export interface TensorSpec {
  name: string;
  shape: number[];
}

/** Tensor names and shapes, in layer order: `<layer>/kernel`, `<layer>/bias`. */
export const TENSOR_SPECS: readonly TensorSpec[] = LAYERS.flatMap((layer) =>
  layer.kind === 'conv'
    ? [
        {
          name: `${layer.name}/kernel`,
          shape: [
            layer.kernelSize,
            layer.kernelSize,
            layer.inChannels,
            layer.outChannels,
          ],
        },
        { name: `${layer.name}/bias`, shape: [layer.outChannels] },
      ]
    : [
        {
          name: `${layer.name}/kernel`,
          shape: [layer.inUnits, layer.outUnits],
        },
        { name: `${layer.name}/bias`, shape: [layer.outUnits] },
      ],
);

/** Model weights: tensor name to float32 values in the TF.js layout. */
export type WeightMap = Map<string, Float32Array>;

/** Layer names, in order. */
export const LAYER_NAMES: readonly string[] = LAYERS.map((layer) => layer.name);

/** Tensor names of the given layers, in layer order. */
export function tensorNamesOfLayers(layerNames: readonly string[]): string[] {
  for (const name of layerNames) {
    if (!LAYER_NAMES.includes(name)) {
      throw new RangeError(
        `unknown layer ${JSON.stringify(name)}; expected one of ${LAYER_NAMES.join(', ')}`,
      );
    }
  }
  return TENSOR_SPECS.filter((spec) =>
    layerNames.includes(spec.name.split('/')[0]),
  ).map((spec) => spec.name);
}

/** Default layers vehicles train: the two dense layers. */
export const DEFAULT_TRAINABLE_LAYERS: readonly string[] = ['dense1', 'dense2'];
