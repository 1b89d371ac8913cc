/**
 * ONNX export of the perception model. The graph takes NHWC images as
 * TF.js does and transposes them to NCHW for ONNX `Conv`. Before the
 * flatten it transposes back to NHWC, so the 1,024 features come in the
 * same order as TF.js `reshape` and the dense kernels need no permutation.
 */
import onnxProto from 'onnx-proto';
import {
  IMAGE_CHANNELS,
  IMAGE_SIZE,
  LAYERS,
  MODEL_NAME,
  TENSOR_SPECS,
  type ConvLayer,
  type Layer,
  type WeightMap,
} from './architecture.ts';
import {
  LAYOUT_METADATA_KEY,
  LAYOUT_METADATA_VALUE,
  MODEL_NAME_METADATA_KEY,
  ONNX_BATCH_DIM,
  ONNX_FEATURES_NAME,
  ONNX_INPUT_NAME,
  ONNX_IR_VERSION,
  ONNX_OPSET_VERSION,
  ONNX_OUTPUT_NAME,
  ONNX_PRODUCER_NAME,
  convKernelToOnnx,
  isConvKernel,
  onnxInitializerShape,
  validateWeightMap,
} from './onnx-layout.ts';

const { onnx } = onnxProto;

type Layout = 'nhwc' | 'nchw' | 'flat';

/** State of the activation while the graph is built. */
interface Activation {
  name: string;
  layout: Layout;
  /** Shape without the batch dimension, in `layout` order. */
  shape: number[];
}

/** Nodes and the activation they end in. */
interface GraphPart {
  nodes: onnxProto.onnx.INodeProto[];
  activation: Activation;
}

/**
 * Exports the classifier as an ONNX model (IR 8, opset 13). Input "image"
 * is float32 NHWC [batch, 32, 32, 3] with values in [0, 1]; output
 * "probabilities" is the softmax over the 43 classes, [batch, 43].
 * Throws FleetError INVALID_MODEL when `weights` do not match the
 * architecture or hold NaN or infinite values.
 */
export function exportOnnx(
  weights: WeightMap,
  options: { docString?: string } = {},
): Uint8Array {
  validateWeightMap(weights);
  const graph = buildClassifierGraph(weights);
  return encodeModel(graph, options.docString ?? '');
}

/**
 * Exports the layers before `beforeLayer` as an ONNX model with output
 * "features": the activation that layer receives. That is [batch, 1024]
 * before dense1, [batch, 128] before dense2, and NHWC [batch, h, w, c]
 * before a conv layer (the image itself before conv1). Only the tensors of
 * those layers are needed and exported. Throws RangeError for an unknown
 * layer and FleetError INVALID_MODEL for bad weights.
 */
export function exportFeatureExtractor(
  weights: WeightMap,
  beforeLayer: string,
): Uint8Array {
  const stop = LAYERS.findIndex((layer) => layer.name === beforeLayer);
  if (stop < 0) {
    throw new RangeError(
      `unknown layer ${JSON.stringify(beforeLayer)}; expected one of ` +
        LAYERS.map((layer) => layer.name).join(', '),
    );
  }
  const prefix = LAYERS.slice(0, stop);
  const names = TENSOR_SPECS.map((spec) => spec.name).filter((name) =>
    prefix.some((layer) => name.startsWith(`${layer.name}/`)),
  );
  validateWeightMap(weights, names, true);

  const part = buildLayers(prefix);
  const finished = finishFeatures(part, LAYERS[stop]);
  const graph: onnxProto.onnx.IGraphProto = {
    name: `${MODEL_NAME}-features-before-${beforeLayer}`,
    node: finished.nodes,
    initializer: names.map((name) => makeInitializer(name, weights)),
    input: [imageValueInfo()],
    output: [makeValueInfo(ONNX_FEATURES_NAME, finished.activation.shape)],
  };
  return encodeModel(graph, `features before ${beforeLayer} of ${MODEL_NAME}`);
}

/** Builds the classifier graph from weights that validateWeightMap accepted. */
export function buildClassifierGraph(
  weights: WeightMap,
): onnxProto.onnx.IGraphProto {
  return {
    name: MODEL_NAME,
    node: buildClassifierNodes(),
    initializer: TENSOR_SPECS.map((spec) =>
      makeInitializer(spec.name, weights),
    ),
    input: [imageValueInfo()],
    output: [makeValueInfo(ONNX_OUTPUT_NAME, [outUnits()])],
  };
}

/** Builds the nodes of the classifier graph, which depend on LAYERS only. */
export function buildClassifierNodes(): onnxProto.onnx.INodeProto[] {
  const part = buildLayers(LAYERS);
  const softmax = makeNode(
    'Softmax',
    'softmax',
    [part.activation.name],
    [ONNX_OUTPUT_NAME],
    [intAttribute('axis', 1)],
  );
  return [...part.nodes, softmax];
}

function outUnits(): number {
  const last = LAYERS.at(-1)!;
  return last.kind === 'dense' ? last.outUnits : last.outChannels;
}

function buildLayers(layers: readonly Layer[]): GraphPart {
  let part: GraphPart = {
    nodes: [],
    activation: {
      name: ONNX_INPUT_NAME,
      layout: 'nhwc',
      shape: [IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS],
    },
  };
  for (const layer of layers) {
    part =
      layer.kind === 'conv'
        ? appendConv(part, layer)
        : appendDense(part, layer);
  }
  return part;
}

/** Conv with "same" padding as TF.js computes it, ReLU, 2x2 max pool. */
function appendConv(part: GraphPart, layer: ConvLayer): GraphPart {
  const input = toLayout(part, 'nchw', layer.name);
  const k = layer.kernelSize;
  const padBegin = Math.floor((k - 1) / 2);
  const padEnd = k - 1 - padBegin;
  const [channels, height, width] = input.activation.shape;
  if (channels !== layer.inChannels) {
    throw new RangeError(
      `layer ${layer.name} expects ${layer.inChannels} channels, gets ${channels}`,
    );
  }
  const name = layer.name;
  const nodes = [
    makeNode(
      'Conv',
      `${name}/conv`,
      [input.activation.name, `${name}/kernel`, `${name}/bias`],
      [`${name}/conv`],
      [
        intsAttribute('kernel_shape', [k, k]),
        intsAttribute('pads', [padBegin, padBegin, padEnd, padEnd]),
        intsAttribute('strides', [1, 1]),
      ],
    ),
    makeNode('Relu', `${name}/relu`, [`${name}/conv`], [`${name}/relu`]),
    makeNode(
      'MaxPool',
      `${name}/pool`,
      [`${name}/relu`],
      [`${name}/pool`],
      [intsAttribute('kernel_shape', [2, 2]), intsAttribute('strides', [2, 2])],
    ),
  ];
  return {
    nodes: [...input.nodes, ...nodes],
    activation: {
      name: `${name}/pool`,
      layout: 'nchw',
      shape: [layer.outChannels, Math.floor(height / 2), Math.floor(width / 2)],
    },
  };
}

/** Gemm with the TF.js [in, out] kernel as B and the bias as C. */
function appendDense(
  part: GraphPart,
  layer: Extract<Layer, { kind: 'dense' }>,
): GraphPart {
  const input = toLayout(part, 'flat', layer.name);
  if (input.activation.shape[0] !== layer.inUnits) {
    throw new RangeError(
      `layer ${layer.name} expects ${layer.inUnits} inputs, gets ${input.activation.shape[0]}`,
    );
  }
  const name = layer.name;
  const nodes = [
    makeNode(
      'Gemm',
      `${name}/gemm`,
      [input.activation.name, `${name}/kernel`, `${name}/bias`],
      [`${name}/gemm`],
    ),
  ];
  if (layer.relu)
    nodes.push(
      makeNode('Relu', `${name}/relu`, [`${name}/gemm`], [`${name}/relu`]),
    );
  return {
    nodes: [...input.nodes, ...nodes],
    activation: {
      name: nodes.at(-1)!.output![0],
      layout: 'flat',
      shape: [layer.outUnits],
    },
  };
}

/**
 * Brings the activation into `layout`. NCHW goes through NHWC before a
 * flatten, so the flattened order equals TF.js `reshape` on NHWC.
 */
function toLayout(part: GraphPart, layout: Layout, prefix: string): GraphPart {
  const { activation } = part;
  if (activation.layout === layout) return part;
  if (activation.layout === 'flat') {
    throw new RangeError(
      `cannot turn the flat activation ${activation.name} into ${layout}`,
    );
  }
  if (layout === 'flat') {
    const nhwc = toLayout(part, 'nhwc', prefix);
    const name = `${prefix}/flatten`;
    const units = nhwc.activation.shape.reduce(
      (product, dim) => product * dim,
      1,
    );
    return {
      nodes: [
        ...nhwc.nodes,
        makeNode(
          'Flatten',
          name,
          [nhwc.activation.name],
          [name],
          [intAttribute('axis', 1)],
        ),
      ],
      activation: { name, layout: 'flat', shape: [units] },
    };
  }
  const toNchw = layout === 'nchw';
  const name = `${prefix}/to_${layout}`;
  const [a, b, c] = activation.shape;
  const transpose = makeNode(
    'Transpose',
    name,
    [activation.name],
    [name],
    [intsAttribute('perm', toNchw ? [0, 3, 1, 2] : [0, 2, 3, 1])],
  );
  return {
    nodes: [...part.nodes, transpose],
    activation: { name, layout, shape: toNchw ? [c, a, b] : [b, c, a] },
  };
}

/** Ends a prefix in the layout the next layer takes, named "features". */
function finishFeatures(part: GraphPart, next: Layer): GraphPart {
  const target = toLayout(
    part,
    next.kind === 'dense' ? 'flat' : 'nhwc',
    `before_${next.name}`,
  );
  const last = target.nodes.at(-1);
  if (last === undefined) {
    const identity = makeNode(
      'Identity',
      'features',
      [target.activation.name],
      [ONNX_FEATURES_NAME],
    );
    return {
      nodes: [identity],
      activation: { ...target.activation, name: ONNX_FEATURES_NAME },
    };
  }
  last.output = [ONNX_FEATURES_NAME];
  return {
    nodes: target.nodes,
    activation: { ...target.activation, name: ONNX_FEATURES_NAME },
  };
}

function encodeModel(
  graph: onnxProto.onnx.IGraphProto,
  docString: string,
): Uint8Array {
  const model: onnxProto.onnx.IModelProto = {
    irVersion: ONNX_IR_VERSION,
    opsetImport: [{ domain: '', version: ONNX_OPSET_VERSION }],
    producerName: ONNX_PRODUCER_NAME,
    docString,
    graph,
    metadataProps: [
      { key: MODEL_NAME_METADATA_KEY, value: MODEL_NAME },
      { key: LAYOUT_METADATA_KEY, value: LAYOUT_METADATA_VALUE },
    ],
  };
  return onnx.ModelProto.encode(model).finish();
}

function makeInitializer(
  name: string,
  weights: WeightMap,
): onnxProto.onnx.ITensorProto {
  const spec = TENSOR_SPECS.find((candidate) => candidate.name === name)!;
  const values = weights.get(name)!;
  const stored = isConvKernel(name)
    ? convKernelToOnnx(values, spec.shape)
    : values;
  return {
    name,
    dims: onnxInitializerShape(name),
    dataType: onnx.TensorProto.DataType.FLOAT,
    rawData: float32ToLittleEndian(stored),
  };
}

/** ONNX raw_data is little-endian whatever the host order. */
function float32ToLittleEndian(values: Float32Array): Uint8Array {
  const bytes = new Uint8Array(values.length * 4);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < values.length; i++)
    view.setFloat32(i * 4, values[i], true);
  return bytes;
}

function imageValueInfo(): onnxProto.onnx.IValueInfoProto {
  return makeValueInfo(ONNX_INPUT_NAME, [
    IMAGE_SIZE,
    IMAGE_SIZE,
    IMAGE_CHANNELS,
  ]);
}

/** Float32 value info with the symbolic batch dimension in front. */
function makeValueInfo(
  name: string,
  shape: readonly number[],
): onnxProto.onnx.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: onnx.TensorProto.DataType.FLOAT,
        shape: {
          dim: [
            { dimParam: ONNX_BATCH_DIM },
            ...shape.map((dim) => ({ dimValue: dim })),
          ],
        },
      },
    },
  };
}

function makeNode(
  opType: string,
  name: string,
  input: string[],
  output: string[],
  attribute: onnxProto.onnx.IAttributeProto[] = [],
): onnxProto.onnx.INodeProto {
  return { opType, name, input, output, attribute };
}

function intAttribute(
  name: string,
  value: number,
): onnxProto.onnx.IAttributeProto {
  return { name, type: onnx.AttributeProto.AttributeType.INT, i: value };
}

function intsAttribute(
  name: string,
  values: number[],
): onnxProto.onnx.IAttributeProto {
  return { name, type: onnx.AttributeProto.AttributeType.INTS, ints: values };
}
