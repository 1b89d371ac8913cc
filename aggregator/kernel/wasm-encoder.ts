/**
 * A small WebAssembly binary encoder: enough to emit one module with
 * imported memory and a few exported functions, written as instruction
 * byte arrays. The project has no WebAssembly toolchain at build time, so
 * the aggregation kernel is assembled from these helpers at run time.
 *
 * Opcodes follow the WebAssembly 2.0 binary format, including the
 * fixed-width SIMD instructions (prefix 0xfd, then a LEB128 opcode).
 */

/** Value types of the binary format. */
export const ValueType = {
  i32: 0x7f,
  f32: 0x7d,
  f64: 0x7c,
  v128: 0x7b,
} as const;

export type ValueTypeCode = (typeof ValueType)[keyof typeof ValueType];

/** One instruction or a sequence of them, as bytes. */
export type Code = number[];

/** Encodes an unsigned integer as LEB128. */
export function encodeUnsigned(value: number): number[] {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`expected a non-negative integer, got ${value}`);
  }
  const bytes: number[] = [];
  let rest = value;
  do {
    let byte = rest % 128;
    rest = Math.floor(rest / 128);
    if (rest > 0) byte |= 0x80;
    bytes.push(byte);
  } while (rest > 0);
  return bytes;
}

/** Encodes a signed 32-bit integer as LEB128 (for i32.const). */
export function encodeSigned(value: number): number[] {
  if (!Number.isInteger(value) || value < -(2 ** 31) || value >= 2 ** 31) {
    throw new RangeError(`expected a signed 32-bit integer, got ${value}`);
  }
  const bytes: number[] = [];
  let rest = value;
  for (;;) {
    const byte = rest & 0x7f;
    rest >>= 7;
    const isLast =
      (rest === 0 && (byte & 0x40) === 0) ||
      (rest === -1 && (byte & 0x40) !== 0);
    bytes.push(isLast ? byte : byte | 0x80);
    if (isLast) return bytes;
  }
}

function encodeName(name: string): number[] {
  const bytes = [...Buffer.from(name, 'utf8')];
  return [...encodeUnsigned(bytes.length), ...bytes];
}

function encodeVector(items: number[][]): number[] {
  return [...encodeUnsigned(items.length), ...items.flat()];
}

function encodeSection(id: number, content: number[]): number[] {
  return [id, ...encodeUnsigned(content.length), ...content];
}

/** Plain instructions used by the kernel. */
export const op = {
  localGet: (index: number): Code => [0x20, ...encodeUnsigned(index)],
  localSet: (index: number): Code => [0x21, ...encodeUnsigned(index)],
  localTee: (index: number): Code => [0x22, ...encodeUnsigned(index)],
  i32Const: (value: number): Code => [0x41, ...encodeSigned(value)],
  f64Const: (value: number): Code => {
    const bytes = Buffer.alloc(8);
    bytes.writeDoubleLE(value);
    return [0x44, ...bytes];
  },
  i32Add: [0x6a] as Code,
  i32Shl: [0x74] as Code,
  i32GeU: [0x4f] as Code,
  /** `block` with no result; closed by `end`. */
  block: [0x02, 0x40] as Code,
  /** `loop` with no result; closed by `end`. */
  loop: [0x03, 0x40] as Code,
  end: [0x0b] as Code,
  br: (depth: number): Code => [0x0c, ...encodeUnsigned(depth)],
  brIf: (depth: number): Code => [0x0d, ...encodeUnsigned(depth)],
};

function simd(opcode: number, ...immediates: number[]): Code {
  return [0xfd, ...encodeUnsigned(opcode), ...immediates];
}

/** Memory argument: alignment as a power of two, then a byte offset. */
function memoryArgument(alignLog2: number, offset: number): number[] {
  return [...encodeUnsigned(alignLog2), ...encodeUnsigned(offset)];
}

/** SIMD instructions used by the kernel (final SIMD opcode numbers). */
export const simdOp = {
  v128Load: (offset = 0): Code => simd(0x00, ...memoryArgument(4, offset)),
  v128Store: (offset = 0): Code => simd(0x0b, ...memoryArgument(4, offset)),
  v128Const: (bytes: number[]): Code => {
    if (bytes.length !== 16) {
      throw new RangeError(`v128.const needs 16 bytes, got ${bytes.length}`);
    }
    return simd(0x0c, ...bytes);
  },
  i8x16Shuffle: (lanes: number[]): Code => {
    if (lanes.length !== 16) {
      throw new RangeError(`shuffle needs 16 lanes, got ${lanes.length}`);
    }
    return simd(0x0d, ...lanes);
  },
  f32x4Splat: simd(0x13),
  f64x2Splat: simd(0x14),
  f32x4Le: simd(0x45),
  v128And: simd(0x4e),
  f64x2PromoteLowF32x4: simd(0x5f),
  f64x2Floor: simd(0x75),
  f64x2Trunc: simd(0x7a),
  i32x4AllTrue: simd(0xa3),
  f32x4Abs: simd(0xe0),
  f64x2Add: simd(0xf0),
  f64x2Sub: simd(0xf1),
  f64x2Mul: simd(0xf2),
};

/** One function of a module: signature, extra locals and body. */
export interface FunctionSpec {
  name: string;
  params: ValueTypeCode[];
  results: ValueTypeCode[];
  /** Locals after the parameters, as [count, type] runs. */
  locals: [number, ValueTypeCode][];
  /** Instructions, without the final `end`. */
  body: Code;
}

/**
 * Assembles a module that imports its memory as `env.memory` (at least
 * one page) and exports each function under its name.
 */
export function encodeModule(
  functions: FunctionSpec[],
): Uint8Array<ArrayBuffer> {
  const types = functions.map((fn) => [
    0x60,
    ...encodeVector(fn.params.map((type) => [type])),
    ...encodeVector(fn.results.map((type) => [type])),
  ]);
  const memoryImport = [
    ...encodeName('env'),
    ...encodeName('memory'),
    0x02, // import kind: memory
    0x00, // limits: minimum only
    ...encodeUnsigned(1),
  ];
  const exports = functions.map((fn, index) => [
    ...encodeName(fn.name),
    0x00, // export kind: function
    ...encodeUnsigned(index),
  ]);
  const bodies = functions.map((fn) => {
    const content = [
      ...encodeVector(
        fn.locals.map(([count, type]) => [...encodeUnsigned(count), type]),
      ),
      ...fn.body,
      ...op.end,
    ];
    return [...encodeUnsigned(content.length), ...content];
  });
  return new Uint8Array([
    ...[0x00, 0x61, 0x73, 0x6d], // magic: \0asm
    ...[0x01, 0x00, 0x00, 0x00], // version 1
    ...encodeSection(1, encodeVector(types)),
    ...encodeSection(2, encodeVector([memoryImport])),
    ...encodeSection(3, encodeVector(functions.map((_, index) => [index]))),
    ...encodeSection(7, encodeVector(exports)),
    ...encodeSection(10, encodeVector(bodies)),
  ]);
}
