/**
 * Reads the weights back out of a model written by exportOnnx. Only that
 * exact graph is accepted, so weights cannot come from a model whose
 * operators would compute something else.
 */
import onnxProto from 'onnx-proto';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { TENSOR_SPECS, type WeightMap } from './architecture.ts';
import {
  LAYOUT_METADATA_KEY,
  LAYOUT_METADATA_VALUE,
  ONNX_INPUT_NAME,
  ONNX_OPSET_VERSION,
  ONNX_OUTPUT_NAME,
  ONNX_PRODUCER_NAME,
  convKernelFromOnnx,
  isConvKernel,
  onnxInitializerShape,
  validateWeightMap,
} from './onnx-layout.ts';
import { buildClassifierNodes } from './onnx-export.ts';

const { onnx } = onnxProto;

type Int64 = number | { toNumber(): number };

/**
 * Returns the weights, in TF.js layout, of an ONNX model produced by
 * exportOnnx. Throws FleetError INVALID_MODEL with the reason for bytes
 * that are not such a model: not ONNX, another producer or graph, a
 * missing initializer, a wrong shape or data type, non-finite values.
 */
export function importOnnxWeights(bytes: Uint8Array): WeightMap {
  if (!(bytes instanceof Uint8Array)) {
    throw new TypeError(`ONNX model must be a Uint8Array, got ${typeof bytes}`);
  }
  const model = decodeModel(bytes);
  const graph = checkModelHeader(model);
  checkGraphNodes(graph);

  const initializers = new Map<string, onnxProto.onnx.ITensorProto>();
  for (const tensor of graph.initializer ?? []) {
    initializers.set(tensor.name ?? '', tensor);
  }
  const weights: WeightMap = new Map();
  for (const spec of TENSOR_SPECS) {
    const tensor = initializers.get(spec.name);
    if (tensor === undefined) {
      throw invalidModel(`ONNX model has no initializer ${spec.name}`);
    }
    const values = readFloat32Initializer(
      tensor,
      onnxInitializerShape(spec.name),
    );
    const tfValues = isConvKernel(spec.name)
      ? convKernelFromOnnx(values, spec.shape)
      : values;
    weights.set(spec.name, tfValues);
  }
  validateWeightMap(weights);
  return weights;
}

function decodeModel(bytes: Uint8Array): onnxProto.onnx.ModelProto {
  try {
    return onnx.ModelProto.decode(bytes);
  } catch (err) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `bytes are not an ONNX ModelProto (${bytes.byteLength} bytes): ${(err as Error).message}`,
      { cause: err },
    );
  }
}

/** Checks producer, layout metadata and opset, then returns the graph. */
function checkModelHeader(
  model: onnxProto.onnx.ModelProto,
): onnxProto.onnx.IGraphProto {
  if (model.producerName !== ONNX_PRODUCER_NAME) {
    throw invalidModel(
      `ONNX model producer is ${JSON.stringify(model.producerName)}, expected ${JSON.stringify(ONNX_PRODUCER_NAME)}`,
    );
  }

  const layout = model.metadataProps.find(
    (entry) => entry.key === LAYOUT_METADATA_KEY,
  );
  if (layout?.value !== LAYOUT_METADATA_VALUE) {
    throw invalidModel(
      `ONNX model metadata ${LAYOUT_METADATA_KEY} is ${JSON.stringify(layout?.value)}, ` +
        `expected ${JSON.stringify(LAYOUT_METADATA_VALUE)}`,
    );
  }

  const opset = model.opsetImport.find((entry) => (entry.domain ?? '') === '');
  const opsetVersion =
    opset === undefined ? undefined : toNumber(opset.version ?? 0);
  if (opsetVersion !== ONNX_OPSET_VERSION) {
    throw invalidModel(
      `ONNX model has opset ${opsetVersion}, expected ${ONNX_OPSET_VERSION}`,
    );
  }
  return checkGraphInterface(model.graph);
}

/** Checks that the graph has one input "image" and one output "probabilities". */
function checkGraphInterface(
  graph: onnxProto.onnx.IGraphProto | null | undefined,
): onnxProto.onnx.IGraphProto {
  if (graph === null || graph === undefined) {
    throw invalidModel('ONNX model has no graph');
  }
  const inputs = (graph.input ?? []).map((value) => value.name);
  const outputs = (graph.output ?? []).map((value) => value.name);
  if (
    inputs.join() !== ONNX_INPUT_NAME ||
    outputs.join() !== ONNX_OUTPUT_NAME
  ) {
    throw invalidModel(
      `ONNX graph has inputs [${inputs.join(', ')}] and outputs [${outputs.join(', ')}], ` +
        `expected [${ONNX_INPUT_NAME}] and [${ONNX_OUTPUT_NAME}]`,
    );
  }
  return graph;
}

/** Compares the nodes with the ones exportOnnx writes for this architecture. */
function checkGraphNodes(graph: onnxProto.onnx.IGraphProto): void {
  const actual = (graph.node ?? []).map(describeNode);
  const expected = buildClassifierNodes().map(describeNode);
  if (actual.length !== expected.length) {
    throw invalidModel(
      `ONNX graph has ${actual.length} nodes, expected ${expected.length}`,
    );
  }
  const index = actual.findIndex((text, i) => text !== expected[i]);
  if (index >= 0) {
    throw invalidModel(
      `ONNX graph node ${index} is ${actual[index]}, expected ${expected[index]}`,
    );
  }
}

/** Describes a node in one line: operator, inputs, outputs and attributes. */
function describeNode(node: onnxProto.onnx.INodeProto): string {
  const attributes = (node.attribute ?? []).map((attribute) => {
    const ints = (attribute.ints ?? []).map((value) => toNumber(value));
    const value =
      ints.length > 0
        ? `[${ints.join(',')}]`
        : String(toNumber(attribute.i ?? 0));
    return `${attribute.name}=${value}`;
  });
  return (
    `${node.opType}(${(node.input ?? []).join(', ')}) -> ` +
    `${(node.output ?? []).join(', ')} {${attributes.join(' ')}}`
  );
}

/** Reads the values of a float32 initializer from raw_data or float_data. */
function readFloat32Initializer(
  tensor: onnxProto.onnx.ITensorProto,
  shape: number[],
): Float32Array {
  const name = tensor.name;
  if (tensor.dataType !== onnx.TensorProto.DataType.FLOAT) {
    throw invalidModel(
      `initializer ${name} has data type ${tensor.dataType}, expected 1 (float32)`,
    );
  }
  const dims = (tensor.dims ?? []).map((dim) => toNumber(dim));
  if (dims.join() !== shape.join()) {
    throw invalidModel(
      `initializer ${name} has shape [${dims.join(', ')}], expected [${shape.join(', ')}]`,
    );
  }
  const count = shape.reduce((product, dim) => product * dim, 1);
  const raw = tensor.rawData;
  if (raw !== null && raw !== undefined && raw.byteLength > 0) {
    if (raw.byteLength !== count * 4) {
      throw invalidModel(
        `initializer ${name} has ${raw.byteLength} bytes of raw_data, expected ${count * 4}`,
      );
    }
    // A DataView reads little-endian at any byte offset, so unaligned
    // decoder views need no copy first.
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const values = new Float32Array(count);
    for (let i = 0; i < count; i++) values[i] = view.getFloat32(i * 4, true);
    return values;
  }
  const floats = tensor.floatData ?? [];
  if (floats.length !== count) {
    throw invalidModel(
      `initializer ${name} has ${floats.length} values, expected ${count}`,
    );
  }
  return Float32Array.from(floats);
}

function toNumber(value: Int64): number {
  return typeof value === 'number' ? value : value.toNumber();
}

function invalidModel(message: string): FleetError {
  return new FleetError(ErrorCode.InvalidModel, message);
}
