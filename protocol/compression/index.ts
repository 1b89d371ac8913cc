export {
  FLOAT16_MAX,
  decodeFloat16,
  encodeFloat16,
  fromFloat16Bits,
  toFloat16Bits,
} from './float16.ts';
export {
  INT8_LEVELS,
  dequantizeInt8,
  quantizeInt8,
  quantizeToInt8,
} from './int8.ts';
export type { Int8Encoded, Int8Quantized } from './int8.ts';
export { decodeTopK, encodeTopK, selectTopK, topkCount } from './topk.ts';
export type { TopKEncoded } from './topk.ts';
export {
  COMPRESSION_NAMES,
  CompressionKind,
  DEFAULT_TOPK_DENSITY,
  NO_COMPRESSION,
  checkUpdateCompression,
  compressionNameOf,
  compressionOfFlags,
  compressionOfTask,
  describeCompression,
  describeEncoding,
  encodingOf,
  parseUpdateCompression,
} from './update-compression.ts';
export type {
  CompressedRoundTask,
  CompressionFlags,
  CompressionName,
  UpdateCompression,
} from './update-compression.ts';
export { decodeDeltaValues, encodeDeltaTensor } from '../tensor.ts';
export type { CompressedWireTensor } from '../tensor.ts';
