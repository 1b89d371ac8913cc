/**
 * Explanations for the `explain` command: occlusion sensitivity of one
 * image's predicted class, drawn as a PNG heat map over the image.
 *
 * Occlusion sensitivity (Zeiler and Fergus, "Visualizing and
 * Understanding Convolutional Networks", ECCV 2014) covers one square
 * patch of the image at a time and measures how much the score of the
 * explained class falls. It needs only forward passes, so it works on the
 * deployed ONNX model without gradients.
 */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import {
  IMAGE_CHANNELS,
  IMAGE_SIZE,
  NUM_CLASSES,
} from '../models/architecture.ts';
import { OnnxClassifier, decodeImageFile } from '../models/index.ts';
import { IMAGE_VALUES } from '../models/image-decode.ts';
import { ErrorCode, FleetError } from '../protocol/index.ts';
import { topClasses, type ClassScore } from './classify.ts';
import { readDeployedModel } from './model-files.ts';

/** Patch geometry, fill colour and score of an occlusion run. */
export interface OcclusionOptions {
  /** Side of the square patch in model pixels (1..32). Default 8. */
  patchSize?: number;
  /** Step between patch positions in model pixels (1..patchSize). Default 2. */
  stride?: number;
  /**
   * Value of the covered pixels: 'mean' (the image's mean colour, the
   * default) or a grey level in [0, 1].
   */
  fill?: 'mean' | number;
  /**
   * Score whose fall under a patch is measured: the class's log-odds
   * (default) or its probability. The probability saturates. On 18 of
   * the 2,150 gtsrb32 test images, no 8x8 patch lowered the base model's
   * float32 probability of its top class, so the map stayed empty, while
   * the log-odds still fell.
   */
  score?: OcclusionScore;
}

/** Measures of the explained class that occlusion can lower. */
export const OCCLUSION_SCORES = ['log-odds', 'probability'] as const;
export type OcclusionScore = (typeof OCCLUSION_SCORES)[number];

/** Occlusion sensitivity of one image for one class. */
export interface OcclusionMap {
  classId: number;
  /** Probability of `classId` on the whole image. */
  probability: number;
  /**
   * Mean fall of the score over the patches that cover each pixel,
   * row-major [32 * 32]. Negative where covering a pixel raised it.
   */
  drop: Float32Array;
  /** Patch positions evaluated, all in one batch. */
  patchCount: number;
}

/** Default patch side and stride, in model pixels. */
export const DEFAULT_PATCH_SIZE = 8;
export const DEFAULT_STRIDE = 2;

function checkInteger(
  name: string,
  value: number,
  max: number,
  unit = '',
): void {
  if (!Number.isSafeInteger(value) || value < 1 || value > max) {
    throw new RangeError(
      `${name} is ${value}, expected an integer from 1 to ${max}${unit}`,
    );
  }
}

const MODEL_PIXELS = ` (model pixels of the ${IMAGE_SIZE}x${IMAGE_SIZE} input)`;

function resolveOcclusion(
  options: OcclusionOptions,
): Required<OcclusionOptions> {
  const patchSize = options.patchSize ?? DEFAULT_PATCH_SIZE;
  checkInteger('patch size', patchSize, IMAGE_SIZE, MODEL_PIXELS);
  const stride = options.stride ?? Math.min(DEFAULT_STRIDE, patchSize);
  // A stride above the patch size would leave pixels no patch covers.
  checkInteger('stride', stride, patchSize, MODEL_PIXELS);
  const fill = options.fill ?? 'mean';
  const isGrey = typeof fill === 'number' && fill >= 0 && fill <= 1;
  if (fill !== 'mean' && !isGrey) {
    throw new RangeError(
      `fill is ${String(fill)}, expected 'mean' or a number in [0, 1]`,
    );
  }
  const score = options.score ?? 'log-odds';
  if (!OCCLUSION_SCORES.includes(score)) {
    throw new RangeError(
      `score is ${String(score)}, expected one of ${OCCLUSION_SCORES.join(', ')}`,
    );
  }
  return { patchSize, stride, fill, score };
}

function checkClassId(classId: number): void {
  if (!Number.isSafeInteger(classId) || classId < 0 || classId >= NUM_CLASSES) {
    throw new RangeError(
      `class id is ${classId}, expected an integer from 0 to ${NUM_CLASSES - 1}`,
    );
  }
}

/** Smallest probability the log-odds use, so that log never gets 0. */
const MIN_PROBABILITY = 1e-30;

/**
 * Returns the score of `classId` in the probabilities of the image at
 * `offset`. The log-odds sum the other classes' probabilities instead of
 * taking 1 - p, which rounds to 0 in float32 when p is near 1.
 */
function scoreFunction(
  kind: OcclusionScore,
  classId: number,
): (probabilities: Float32Array, offset: number) => number {
  if (kind === 'probability') {
    return (probabilities, offset) => probabilities[offset + classId];
  }
  return (probabilities, offset) => {
    let others = 0;
    for (let c = 0; c < NUM_CLASSES; c++) {
      if (c !== classId) others += probabilities[offset + c];
    }
    const own = probabilities[offset + classId];
    return (
      Math.log(Math.max(own, MIN_PROBABILITY)) -
      Math.log(Math.max(others, MIN_PROBABILITY))
    );
  };
}

/** Patch origins along one axis; the last one touches the far edge. */
export function patchOrigins(patchSize: number, stride: number): number[] {
  const last = IMAGE_SIZE - patchSize;
  const origins: number[] = [];
  for (let origin = 0; origin < last; origin += stride) origins.push(origin);
  origins.push(last);
  return origins;
}

function fillColour(image: Float32Array, fill: 'mean' | number): number[] {
  if (fill !== 'mean') return new Array<number>(IMAGE_CHANNELS).fill(fill);
  const sums = new Array<number>(IMAGE_CHANNELS).fill(0);
  for (let i = 0; i < IMAGE_VALUES; i++) sums[i % IMAGE_CHANNELS] += image[i];
  return sums.map((sum) => sum / (IMAGE_SIZE * IMAGE_SIZE));
}

/** Copies of `image`, one per patch, with that patch covered. */
function occludedBatch(
  image: Float32Array,
  patches: Array<[number, number]>,
  patchSize: number,
  colour: number[],
): Float32Array {
  const batch = new Float32Array(patches.length * IMAGE_VALUES);
  patches.forEach(([top, left], index) => {
    const offset = index * IMAGE_VALUES;
    batch.set(image, offset);
    for (let y = top; y < top + patchSize; y++) {
      for (let x = left; x < left + patchSize; x++) {
        const pixel = offset + (y * IMAGE_SIZE + x) * IMAGE_CHANNELS;
        for (let c = 0; c < IMAGE_CHANNELS; c++) batch[pixel + c] = colour[c];
      }
    }
  });
  return batch;
}

/**
 * Computes the occlusion sensitivity of `classId` on one image (NHWC
 * floats in [0, 1]). Every occluded copy goes through onnxruntime in one
 * predict call, which runs them in batches of INFERENCE_BATCH_SIZE.
 *
 * @throws {RangeError} for a bad image length, class id or option.
 */
export async function computeOcclusion(
  classifier: OnnxClassifier,
  image: Float32Array,
  classId: number,
  options: OcclusionOptions = {},
): Promise<OcclusionMap> {
  const { patchSize, stride, fill, score } = resolveOcclusion(options);
  if (image.length !== IMAGE_VALUES) {
    throw new RangeError(
      `image has ${image.length} values, expected ${IMAGE_VALUES}`,
    );
  }
  checkClassId(classId);

  const origins = patchOrigins(patchSize, stride);
  const patches = origins.flatMap((top) =>
    origins.map((left): [number, number] => [top, left]),
  );
  const batch = occludedBatch(
    image,
    patches,
    patchSize,
    fillColour(image, fill),
  );
  const whole = await classifier.predict(image, 1);
  const occluded = await classifier.predict(batch, patches.length);

  const probability = whole[classId];
  const scoreOf = scoreFunction(score, classId);
  const base = scoreOf(whole, 0);
  const sum = new Float32Array(IMAGE_SIZE * IMAGE_SIZE);
  const count = new Float32Array(IMAGE_SIZE * IMAGE_SIZE);
  patches.forEach(([top, left], index) => {
    const drop = base - scoreOf(occluded, index * NUM_CLASSES);
    for (let y = top; y < top + patchSize; y++) {
      for (let x = left; x < left + patchSize; x++) {
        sum[y * IMAGE_SIZE + x] += drop;
        count[y * IMAGE_SIZE + x] += 1;
      }
    }
  });
  const drop = sum.map((value, pixel) => value / count[pixel]);
  return { classId, probability, drop, patchCount: patches.length };
}

/**
 * Heat in [0, 1] per pixel: the positive part of the drop, divided by its
 * maximum. All zeros when no patch lowered the score.
 */
export function heatOf(drop: Float32Array): Float32Array {
  const max = drop.reduce((best, value) => Math.max(best, value), 0);
  return drop.map((value) => (max > 0 ? Math.max(0, value) / max : 0));
}

/** A box of model pixels: rows top..bottom-1, columns left..right-1. */
export interface PixelBox {
  top: number;
  left: number;
  bottom: number;
  right: number;
}

/**
 * Returns the share of the total heat that lies inside `box`; NaN when
 * the map has no heat.
 */
export function heatShareInside(heat: Float32Array, box: PixelBox): number {
  let inside = 0;
  let total = 0;
  for (let y = 0; y < IMAGE_SIZE; y++) {
    for (let x = 0; x < IMAGE_SIZE; x++) {
      const value = heat[y * IMAGE_SIZE + x];
      total += value;
      if (y >= box.top && y < box.bottom && x >= box.left && x < box.right) {
        inside += value;
      }
    }
  }
  return total > 0 ? inside / total : Number.NaN;
}

/** Colour of heat `h` in [0, 1]: dark blue, through red, to yellow. */
function heatColour(h: number): [number, number, number] {
  const red = Math.min(1, 2 * h);
  const green = Math.max(0, 2 * h - 1);
  const blue = Math.max(0, 0.5 - h);
  return [red * 255, green * 255, blue * 255];
}

/** Bilinear sample of a 32x32 map at fractional model coordinates. */
function sampleBilinear(map: Float32Array, y: number, x: number): number {
  const clamp = (v: number): number => Math.min(IMAGE_SIZE - 1, Math.max(0, v));
  const y0 = Math.floor(clamp(y));
  const x0 = Math.floor(clamp(x));
  const y1 = Math.min(IMAGE_SIZE - 1, y0 + 1);
  const x1 = Math.min(IMAGE_SIZE - 1, x0 + 1);
  const fy = clamp(y) - y0;
  const fx = clamp(x) - x0;
  const at = (row: number, col: number): number => map[row * IMAGE_SIZE + col];
  const top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx;
  const bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx;
  return top * (1 - fy) + bottom * fy;
}

/**
 * Draws the image `scale` times enlarged (nearest neighbour, so the model's
 * pixels stay visible) on the left, and the same image blended with the
 * bilinearly enlarged heat map on the right. Returns PNG bytes.
 */
export async function renderHeatMapPng(
  image: Float32Array,
  heat: Float32Array,
  scale: number,
): Promise<Buffer> {
  checkInteger('scale', scale, 64);
  const side = IMAGE_SIZE * scale;
  const width = 2 * side;
  const rgb = Buffer.alloc(width * side * 3);
  for (let y = 0; y < side; y++) {
    for (let x = 0; x < side; x++) {
      const source =
        (Math.floor(y / scale) * IMAGE_SIZE + Math.floor(x / scale)) * 3;
      // Pixel centres: output pixel x covers model coordinate (x + 0.5) / scale.
      const h = sampleBilinear(
        heat,
        (y + 0.5) / scale - 0.5,
        (x + 0.5) / scale - 0.5,
      );
      const colour = heatColour(h);
      // More heat, more colour; cold areas keep most of the image.
      const alpha = 0.25 + 0.5 * h;
      for (let c = 0; c < 3; c++) {
        const value = image[source + c] * 255;
        rgb[(y * width + x) * 3 + c] = value;
        rgb[(y * width + side + x) * 3 + c] =
          (1 - alpha) * value + alpha * colour[c];
      }
    }
  }
  return sharp(rgb, { raw: { width, height: side, channels: 3 } })
    .png()
    .toBuffer();
}

/** Inputs of {@link explainImageFile}. */
export interface ExplainOptions extends OcclusionOptions {
  image: string;
  /** Agent state directory whose deployed model is used. */
  stateDir?: string;
  /** ONNX file to use instead of the deployed model. */
  modelPath?: string;
  /** Path of the PNG to write. Its directory must exist. */
  outPath: string;
  /** Class to explain; default the predicted one. */
  classId?: number;
  /** Classes listed in the result. Default 5. */
  top?: number;
  /** Enlargement of the 32x32 image in the PNG. Default 8. */
  scale?: number;
}

/** Result of {@link explainImageFile}, as the command prints it. */
export interface ImageExplanation {
  image: string;
  /** Deployed model version, null for a model given by path. */
  modelVersion: number | null;
  modelSource: string;
  heatMap: string;
  method: 'occlusion';
  patchSize: number;
  stride: number;
  fill: 'mean' | number;
  score: OcclusionScore;
  patchCount: number;
  explainedClass: ClassScore;
  top: ClassScore[];
}

async function loadModel(
  options: ExplainOptions,
): Promise<{ onnx: Uint8Array; version?: number; source: string }> {
  const { stateDir, modelPath } = options;
  if ((stateDir === undefined) === (modelPath === undefined)) {
    throw new TypeError('explain needs exactly one of stateDir and modelPath');
  }
  if (stateDir !== undefined) {
    const stored = await readDeployedModel(stateDir);
    const source = path.join(stateDir, stored.file);
    return { onnx: stored.onnx, version: stored.version, source };
  }
  try {
    return {
      onnx: new Uint8Array(await readFile(modelPath!)),
      source: modelPath!,
    };
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'read error';
    throw new FleetError(
      ErrorCode.InvalidModel,
      `cannot read model ${modelPath} (${code})`,
      { cause: err },
    );
  }
}

async function writePng(outPath: string, png: Buffer): Promise<void> {
  try {
    await writeFile(outPath, png);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'write error';
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `cannot write heat map ${outPath} (${code}); its directory must exist`,
      { cause: err },
    );
  }
}

/**
 * Explains one image file: classifies it with the deployed model or the
 * ONNX file, computes the occlusion sensitivity of the predicted class
 * (or `classId`), and writes the heat map PNG to `outPath`.
 *
 * @throws {RangeError} for a bad option, before any file is read.
 * @throws {FleetError} INVALID_MODEL for a missing or bad model,
 *   DATA_NOT_FOUND or INVALID_IMAGE for the image, INVALID_CONFIG when
 *   the PNG cannot be written.
 */
export async function explainImageFile(
  options: ExplainOptions,
): Promise<ImageExplanation> {
  const occlusion = resolveOcclusion(options);
  const top = options.top ?? 5;
  checkInteger('top', top, NUM_CLASSES);
  const scale = options.scale ?? 8;
  checkInteger('scale', scale, 64);
  if (options.classId !== undefined) checkClassId(options.classId);

  const model = await loadModel(options);
  const image = await decodeImageFile(options.image);
  const classifier = await OnnxClassifier.create(model.onnx);
  let ranked: ClassScore[];
  let map: OcclusionMap;
  try {
    ranked = topClasses(await classifier.predict(image, 1), NUM_CLASSES);
    const classId = options.classId ?? ranked[0].classId;
    map = await computeOcclusion(classifier, image, classId, occlusion);
  } finally {
    await classifier.close();
  }

  const png = await renderHeatMapPng(image, heatOf(map.drop), scale);
  await writePng(options.outPath, png);
  return {
    image: options.image,
    modelVersion: model.version ?? null,
    modelSource: model.source,
    heatMap: options.outPath,
    method: 'occlusion',
    ...occlusion,
    patchCount: map.patchCount,
    explainedClass: ranked.find((score) => score.classId === map.classId)!,
    top: ranked.slice(0, top),
  };
}
