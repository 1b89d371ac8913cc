/**
 * Decoding of one image file into the model's input layout: 32x32 RGB,
 * float32 values in [0, 1], row-major HWC. PPM is parsed in JavaScript;
 * PNG, JPEG and any resize go through sharp (libvips).
 */
import { readFile } from 'node:fs/promises';

import sharp from 'sharp';

import { ErrorCode, FleetError } from '../protocol/errors.ts';
import { IMAGE_CHANNELS, IMAGE_SIZE } from './architecture.ts';
import { parsePpm, PpmFormatError } from './ppm.ts';

/** Float values in one decoded image: 32 * 32 * 3. */
export const IMAGE_VALUES = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS;

/** Extensions that `loadLabelledImages` picks up in a folder per class. */
export const IMAGE_EXTENSIONS: readonly string[] = [
  '.ppm',
  '.png',
  '.jpg',
  '.jpeg',
];

function isPpm(bytes: Uint8Array): boolean {
  return bytes.length >= 2 && bytes[0] === 0x50 && bytes[1] === 0x36;
}

function writeFloats(rgb: Uint8Array, out: Float32Array, offset: number): void {
  for (let i = 0; i < IMAGE_VALUES; i++) out[offset + i] = rgb[i] / 255;
}

/**
 * Resizes raw RGB bytes to 32x32 over the whole frame (no crop, aspect
 * ratio not kept), with sharp's bilinear kernel. This matches how the
 * gtsrb32 files were made: the whole GTSRB crop squeezed to 32x32.
 */
export async function resizeRgbTo32(
  rgb: Uint8Array,
  width: number,
  height: number,
): Promise<Buffer> {
  return sharp(rgb, { raw: { width, height, channels: 3 } })
    .resize(IMAGE_SIZE, IMAGE_SIZE, { fit: 'fill', kernel: 'linear' })
    .raw()
    .toBuffer();
}

/** Decodes PNG or JPEG (or anything libvips reads) to 32x32 RGB bytes. */
async function decodeWithSharp(bytes: Uint8Array): Promise<Uint8Array> {
  const { data, info } = await sharp(bytes)
    .rotate() // applies the EXIF orientation of camera JPEGs
    .removeAlpha()
    .toColourspace('srgb')
    .resize(IMAGE_SIZE, IMAGE_SIZE, { fit: 'fill', kernel: 'linear' })
    .raw()
    .toBuffer({ resolveWithObject: true });
  if (info.channels === 3) return data;

  // Defensive: keep the first three channels, or repeat a grey channel.
  const rgb = new Uint8Array(IMAGE_VALUES);
  for (let p = 0; p < IMAGE_SIZE * IMAGE_SIZE; p++) {
    for (let c = 0; c < 3; c++) {
      rgb[p * 3 + c] = data[p * info.channels + Math.min(c, info.channels - 1)];
    }
  }
  return rgb;
}

/**
 * Decodes the bytes of one image file into `out` at `offset`
 * (IMAGE_VALUES floats in [0, 1]).
 *
 * @param path used in error messages only.
 * @throws {FleetError} INVALID_IMAGE naming `path` and the defect.
 */
export async function decodeImageInto(
  bytes: Uint8Array,
  path: string,
  out: Float32Array,
  offset: number,
): Promise<void> {
  try {
    if (isPpm(bytes)) {
      const ppm = parsePpm(bytes);
      const isModelSize = ppm.width === IMAGE_SIZE && ppm.height === IMAGE_SIZE;
      const rgb = isModelSize
        ? ppm.rgb
        : await resizeRgbTo32(ppm.rgb, ppm.width, ppm.height);
      writeFloats(rgb, out, offset);
      return;
    }
    writeFloats(await decodeWithSharp(bytes), out, offset);
  } catch (err) {
    const reason = err instanceof Error ? err.message : String(err);
    const detail =
      err instanceof PpmFormatError ? reason : `cannot decode: ${reason}`;
    throw new FleetError(
      ErrorCode.InvalidImage,
      `invalid image ${path}: ${detail}`,
      { cause: err },
    );
  }
}

/**
 * Reads one image file (PPM, PNG or JPEG) and returns it as 32x32 RGB
 * floats in [0, 1], HWC order, resized with bilinear interpolation when
 * the file is another size.
 *
 * @throws {FleetError} DATA_NOT_FOUND when the file cannot be read,
 *   INVALID_IMAGE when it cannot be decoded.
 */
export async function decodeImageFile(path: string): Promise<Float32Array> {
  const bytes = await readImageBytes(path);
  const out = new Float32Array(IMAGE_VALUES);
  await decodeImageInto(bytes, path, out, 0);
  return out;
}

/** Reads a file, turning a read failure into FleetError DATA_NOT_FOUND. */
export async function readImageBytes(path: string): Promise<Uint8Array> {
  try {
    return await readFile(path);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'read error';
    throw new FleetError(
      ErrorCode.DataNotFound,
      `cannot read image ${path} (${code})`,
      { cause: err },
    );
  }
}
