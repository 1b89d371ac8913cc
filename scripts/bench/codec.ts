/**
 * Protobuf encode and decode of one model update carrying the default
 * trainable tensors (dense1 and dense2), as a vehicle sends it.
 */
import {
  DEFAULT_TRAINABLE_LAYERS,
  MODEL_NAME,
  TENSOR_SPECS,
  createRandom,
  tensorNamesOfLayers,
} from '../../models/index.ts';
import {
  decodeModelUpdate,
  decodeTensorValues,
  encodeFloat32Tensor,
  encodeModelUpdate,
  type ModelUpdate,
} from '../../protocol/index.ts';
import { timeRepeats } from './timing.ts';

export interface CodecResult {
  updateBytes: number;
  tensors: number;
  /** Encodes per measured pass. */
  iterations: number;
  encodeMicroseconds: number;
  /** decodeModelUpdate plus decodeTensorValues of every tensor. */
  decodeMicroseconds: number;
  /** The same decode with the message at byte offset 1 of its buffer. */
  decodeUnalignedMicroseconds: number;
  /** Tensors whose values were viewed in place, not copied, per decode. */
  tensorsViewedInPlace: number;
  tensorsViewedInPlaceUnaligned: number;
}

function buildUpdate(seed: number): ModelUpdate {
  const random = createRandom(seed);
  const names = tensorNamesOfLayers([...DEFAULT_TRAINABLE_LAYERS]);
  const deltas = TENSOR_SPECS.filter((spec) => names.includes(spec.name)).map(
    (spec) => {
      const size = spec.shape.reduce((product, dim) => product * dim, 1);
      const values = Float32Array.from({ length: size }, () => random() - 0.5);
      return encodeFloat32Tensor(spec.name, spec.shape, values);
    },
  );
  return {
    updateId: 'bench-update-1',
    vehicleId: 'veh-bench',
    modelName: MODEL_NAME,
    baseModelVersion: 0,
    round: 1,
    numExamples: 400,
    deltas,
    metrics: {
      trainLoss: 0.5,
      trainAccuracy: 0.8,
      trainDurationMs: 1000,
      backend: 'wasm',
    },
    createdAtMs: Date.now(),
  };
}

/** Decodes `bytes` fully and counts tensors viewed without a copy. */
function decodeAll(bytes: Uint8Array): number {
  const update = decodeModelUpdate(bytes);
  let inPlace = 0;
  for (const tensor of update.deltas) {
    if (decodeTensorValues(tensor).buffer === bytes.buffer) inPlace += 1;
  }
  return inPlace;
}

/** Copies `bytes` to a fresh buffer at byte offset `offset`. */
function copyAt(bytes: Uint8Array, offset: number): Uint8Array {
  const copy = Buffer.alloc(bytes.byteLength + offset);
  copy.set(bytes, offset);
  return copy.subarray(offset);
}

export async function benchCodec(options: {
  iterations: number;
  repeats: number;
  seed: number;
}): Promise<CodecResult> {
  const update = buildUpdate(options.seed);
  const encoded = encodeModelUpdate(update);
  const aligned = copyAt(encoded, 0);
  const unaligned = copyAt(encoded, 1);
  const perCall = (seconds: number) => (seconds / options.iterations) * 1e6;

  // Untimed passes let V8 optimize the codecs first.
  for (let i = 0; i < options.iterations; i++) {
    encodeModelUpdate(update);
    decodeAll(aligned);
    decodeAll(unaligned);
  }
  const encode = await timeRepeats(options.repeats, () => {
    for (let i = 0; i < options.iterations; i++) encodeModelUpdate(update);
  });
  const decode = await timeRepeats(options.repeats, () => {
    for (let i = 0; i < options.iterations; i++) decodeAll(aligned);
  });
  const decodeUnaligned = await timeRepeats(options.repeats, () => {
    for (let i = 0; i < options.iterations; i++) decodeAll(unaligned);
  });
  return {
    updateBytes: encoded.byteLength,
    tensors: update.deltas.length,
    iterations: options.iterations,
    encodeMicroseconds: perCall(encode.best),
    decodeMicroseconds: perCall(decode.best),
    decodeUnalignedMicroseconds: perCall(decodeUnaligned.best),
    tensorsViewedInPlace: decodeAll(aligned),
    tensorsViewedInPlaceUnaligned: decodeAll(unaligned),
  };
}
