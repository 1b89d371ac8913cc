import { IMAGE_CHANNELS, IMAGE_SIZE } from './architecture.ts';

/** Ranges of the random changes augmentImages makes. */
export interface AugmentOptions {
  /** Largest shift in pixels, in each direction; default 2. */
  maxShiftPixels?: number;
  /** Brightness factor range [1 - x, 1 + x]; default 0.4. */
  brightness?: number;
  /** Contrast factor range [1 - x, 1 + x] around the image mean; default 0.4. */
  contrast?: number;
}

const IMAGE_VALUES = IMAGE_SIZE * IMAGE_SIZE * IMAGE_CHANNELS;

/**
 * Changes `count` NHWC 32x32 RGB images in place, each with its own random
 * shift (edge pixels repeat into the gap), brightness factor and contrast
 * factor, then clips to [0, 1]. There is no flip, because mirrored traffic
 * signs change meaning (keep left, keep right). `random` returns numbers
 * in [0, 1); a seeded one makes the result repeatable.
 */
export function augmentImages(
  images: Float32Array,
  count: number,
  random: () => number,
  options: AugmentOptions = {},
): void {
  if (images.length !== count * IMAGE_VALUES) {
    throw new RangeError(
      `images has ${images.length} values, but ${count} images need ` +
        `${count * IMAGE_VALUES}`,
    );
  }
  const maxShift = options.maxShiftPixels ?? 2;
  const brightness = options.brightness ?? 0.4;
  const contrast = options.contrast ?? 0.4;
  const source = new Float32Array(IMAGE_VALUES);
  for (let n = 0; n < count; n++) {
    const image = images.subarray(n * IMAGE_VALUES, (n + 1) * IMAGE_VALUES);
    source.set(image);
    const dx = randomInt(-maxShift, maxShift, random);
    const dy = randomInt(-maxShift, maxShift, random);
    shiftInto(source, image, dx, dy);
    const gain = 1 + (2 * random() - 1) * brightness;
    const stretch = 1 + (2 * random() - 1) * contrast;
    adjustInPlace(image, gain, stretch);
  }
}

function randomInt(min: number, max: number, random: () => number): number {
  return min + Math.floor(random() * (max - min + 1));
}

/** Writes `source` moved by (dx, dy) into `target`, repeating edge pixels. */
function shiftInto(
  source: Float32Array,
  target: Float32Array,
  dx: number,
  dy: number,
): void {
  const last = IMAGE_SIZE - 1;
  for (let y = 0; y < IMAGE_SIZE; y++) {
    const sy = Math.min(last, Math.max(0, y - dy));
    for (let x = 0; x < IMAGE_SIZE; x++) {
      const sx = Math.min(last, Math.max(0, x - dx));
      const from = (sy * IMAGE_SIZE + sx) * IMAGE_CHANNELS;
      const to = (y * IMAGE_SIZE + x) * IMAGE_CHANNELS;
      for (let c = 0; c < IMAGE_CHANNELS; c++)
        target[to + c] = source[from + c];
    }
  }
}

/** Scales contrast around the mean, then brightness, then clips to [0, 1]. */
function adjustInPlace(
  image: Float32Array,
  gain: number,
  stretch: number,
): void {
  let sum = 0;
  for (const value of image) sum += value;
  const mean = sum / image.length;
  for (let i = 0; i < image.length; i++) {
    const value = ((image[i] - mean) * stretch + mean) * gain;
    image[i] = Math.min(1, Math.max(0, value));
  }
}
