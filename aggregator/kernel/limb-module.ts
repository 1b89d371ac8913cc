/**
 * The WebAssembly SIMD module behind the exact FedAvg sums. It does the
 * same arithmetic as the JavaScript loop in exact-sums.ts, two float64
 * lanes at a time, so both give the same three limbs bit for bit:
 *
 *   product = value * numExamples      (exact: 24 bits times at most 26)
 *   whole   = trunc(product)
 *   high    = trunc((product - whole) * 2^26)
 *   low     = round(((product - whole) * 2^26 - high) * 2^26)
 *
 * `round` is Math.round (halves go up). The module computes it as
 * floor(x + 0.5), which is exact here: x has at most 50 significant bits,
 * so x + 0.5 never rounds across an integer.
 *
 * State layout: every 4 elements own 96 bytes, two float64 lanes each of
 * whole, high and low for elements 0-1, then the same for elements 2-3.
 * Inputs are float32, 16-byte aligned, a multiple of 4 long.
 */
import {
  ValueType,
  encodeModule,
  op,
  simdOp,
  type Code,
  type FunctionSpec,
} from './wasm-encoder.ts';

/** Bytes of limb state per element: three float64 limbs. */
export const STATE_BYTES_PER_ELEMENT = 24;
/** Elements the kernel handles per step; counts are padded to it. */
export const ELEMENTS_PER_STEP = 4;

const SCALE = 2 ** 26;

// Parameters and locals of accumulate/subtract.
const INPUT = 0;
const STATE = 1;
const COUNT = 2;
const NUM_EXAMPLES = 3;
const INPUT_END = 4;
const NUM_EXAMPLES_X2 = 5;
const SCALE_X2 = 6;
const HALF_X2 = 7;
const VALUES = 8;
const PRODUCT = 9;
const WHOLE = 10;
const FRACTION = 11;
const HIGH = 12;

/**
 * Combines the limb pair at `offset` of the current state group with
 * `value` (add or subtract) and stores it back.
 */
function updateLimb(offset: number, value: Code, combine: Code): Code {
  return [
    ...op.localGet(STATE),
    ...op.localGet(STATE),
    ...simdOp.v128Load(offset),
    ...value,
    ...combine,
    ...simdOp.v128Store(offset),
  ];
}

/**
 * Updates the limbs of two elements whose float64 values `pair` leaves on
 * the stack; `offset` is the byte offset of their state group.
 */
function updatePair(pair: Code, offset: number, combine: Code): Code {
  const low = [
    ...op.localGet(FRACTION),
    ...op.localGet(HIGH),
    ...simdOp.f64x2Sub,
    ...op.localGet(SCALE_X2),
    ...simdOp.f64x2Mul,
    ...op.localGet(HALF_X2),
    ...simdOp.f64x2Add,
    ...simdOp.f64x2Floor,
  ];
  return [
    ...pair,
    ...op.localGet(NUM_EXAMPLES_X2),
    ...simdOp.f64x2Mul,
    ...op.localTee(PRODUCT),
    ...simdOp.f64x2Trunc,
    ...op.localSet(WHOLE),
    ...op.localGet(PRODUCT),
    ...op.localGet(WHOLE),
    ...simdOp.f64x2Sub,
    ...op.localGet(SCALE_X2),
    ...simdOp.f64x2Mul,
    ...op.localTee(FRACTION),
    ...simdOp.f64x2Trunc,
    ...op.localSet(HIGH),
    ...updateLimb(offset, op.localGet(WHOLE), combine),
    ...updateLimb(offset + 16, op.localGet(HIGH), combine),
    ...updateLimb(offset + 32, low, combine),
  ];
}

/** Moves lanes 2 and 3 of a f32x4 into lanes 0 and 1. */
const UPPER_HALF = [8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15];

function limbFunction(name: string, combine: Code): FunctionSpec {
  const body: Code = [
    ...op.localGet(NUM_EXAMPLES),
    ...simdOp.f64x2Splat,
    ...op.localSet(NUM_EXAMPLES_X2),
    ...op.f64Const(SCALE),
    ...simdOp.f64x2Splat,
    ...op.localSet(SCALE_X2),
    ...op.f64Const(0.5),
    ...simdOp.f64x2Splat,
    ...op.localSet(HALF_X2),
    ...op.localGet(INPUT),
    ...op.localGet(COUNT),
    ...op.i32Const(2),
    ...op.i32Shl,
    ...op.i32Add,
    ...op.localSet(INPUT_END),
    ...op.block,
    ...op.loop,
    ...op.localGet(INPUT),
    ...op.localGet(INPUT_END),
    ...op.i32GeU,
    ...op.brIf(1),
    ...op.localGet(INPUT),
    ...simdOp.v128Load(),
    ...op.localSet(VALUES),
    ...updatePair(
      [...op.localGet(VALUES), ...simdOp.f64x2PromoteLowF32x4],
      0,
      combine,
    ),
    ...updatePair(
      [
        ...op.localGet(VALUES),
        ...op.localGet(VALUES),
        ...simdOp.i8x16Shuffle(UPPER_HALF),
        ...simdOp.f64x2PromoteLowF32x4,
      ],
      48,
      combine,
    ),
    ...op.localGet(INPUT),
    ...op.i32Const(16),
    ...op.i32Add,
    ...op.localSet(INPUT),
    ...op.localGet(STATE),
    ...op.i32Const(96),
    ...op.i32Add,
    ...op.localSet(STATE),
    ...op.br(0),
    ...op.end,
    ...op.end,
  ];
  return {
    name,
    params: [ValueType.i32, ValueType.i32, ValueType.i32, ValueType.f64],
    results: [],
    locals: [
      [1, ValueType.i32],
      [8, ValueType.v128],
    ],
    body,
  };
}

/**
 * `check(input, count, limit)` returns 1 when every |value| <= limit, and
 * 0 when one is larger or not finite (NaN fails every comparison).
 */
function checkFunction(): FunctionSpec {
  const [input, count, limit, inputEnd, limitX4, passed] = [0, 1, 2, 3, 4, 5];
  const body: Code = [
    ...op.localGet(limit),
    ...simdOp.f32x4Splat,
    ...op.localSet(limitX4),
    ...simdOp.v128Const(new Array(16).fill(0xff)),
    ...op.localSet(passed),
    ...op.localGet(input),
    ...op.localGet(count),
    ...op.i32Const(2),
    ...op.i32Shl,
    ...op.i32Add,
    ...op.localSet(inputEnd),
    ...op.block,
    ...op.loop,
    ...op.localGet(input),
    ...op.localGet(inputEnd),
    ...op.i32GeU,
    ...op.brIf(1),
    ...op.localGet(passed),
    ...op.localGet(input),
    ...simdOp.v128Load(),
    ...simdOp.f32x4Abs,
    ...op.localGet(limitX4),
    ...simdOp.f32x4Le,
    ...simdOp.v128And,
    ...op.localSet(passed),
    ...op.localGet(input),
    ...op.i32Const(16),
    ...op.i32Add,
    ...op.localSet(input),
    ...op.br(0),
    ...op.end,
    ...op.end,
    ...op.localGet(passed),
    ...simdOp.i32x4AllTrue,
  ];
  return {
    name: 'check',
    params: [ValueType.i32, ValueType.i32, ValueType.f32],
    results: [ValueType.i32],
    locals: [
      [1, ValueType.i32],
      [2, ValueType.v128],
    ],
    body,
  };
}

/** Exported functions of the limb module. */
export interface LimbExports {
  /** Adds count values at `input` times numExamples to the limbs at `state`. */
  accumulate(
    input: number,
    state: number,
    count: number,
    numExamples: number,
  ): void;
  /** Takes back exactly what `accumulate` with the same arguments added. */
  subtract(
    input: number,
    state: number,
    count: number,
    numExamples: number,
  ): void;
  check(input: number, count: number, limit: number): number;
}

let compiled: WebAssembly.Module | null | undefined;

/**
 * Returns the compiled limb module, or null when this runtime cannot
 * compile it (no WebAssembly SIMD). Compiles once per process.
 */
export function limbModule(): WebAssembly.Module | null {
  if (compiled !== undefined) return compiled;
  const bytes = encodeModule([
    limbFunction('accumulate', simdOp.f64x2Add),
    limbFunction('subtract', simdOp.f64x2Sub),
    checkFunction(),
  ]);
  compiled = WebAssembly.validate(bytes) ? new WebAssembly.Module(bytes) : null;
  return compiled;
}
