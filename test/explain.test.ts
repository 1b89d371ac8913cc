import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import sharp from 'sharp';

import { MODEL_NAME, NUM_CLASSES } from '../models/architecture.ts';
import {
  OnnxClassifier,
  decodeImageFile,
  exportOnnx,
  readWeightsFile,
  sha256Hex,
} from '../models/index.ts';
import { ErrorCode, createLogger, isFleetError } from '../protocol/index.ts';
import { ModelDeployment } from '../vehicle-agent/index.ts';
import {
  computeOcclusion,
  explainImageFile,
  heatOf,
  heatShareInside,
  patchOrigins,
  type PixelBox,
} from '../vehicle-agent/explain.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  path.resolve(REPO_ROOT, '../shared/data/gtsrb32');
const BASE_WEIGHTS = path.join(
  REPO_ROOT,
  'models/base/gtsrb-cnn-v0.weights.pb',
);

/** Central 16x16 pixels of the 32x32 input: a quarter of the area. */
const CENTRE: PixelBox = { top: 8, left: 8, bottom: 24, right: 24 };
const CENTRE_AREA_SHARE = 0.25;
const LOWER_RIGHT: PixelBox = { top: 16, left: 16, bottom: 32, right: 32 };

/** A test image with its sign's box (GTSRB ROI) in model pixels. */
interface SignImage {
  file: string;
  classId: number;
  signBox: PixelBox;
}

/**
 * Reads ten images spread over test.csv (rows 7, 222, ..., 1942), so that
 * the check covers many classes. The ROI columns are in the original
 * image's pixels. Each 32x32 file is the whole original squeezed, so the
 * box scales by 32 / width and 32 / height.
 */
function readSignImages(): SignImage[] {
  const rows = readFileSync(path.join(DATA_DIR, 'test.csv'), 'utf8')
    .trim()
    .split('\n')
    .slice(1)
    .map((line) => line.split(';'));
  return Array.from({ length: 10 }, (_, k) => {
    const [file, width, height, x1, y1, x2, y2, classId] = rows[k * 215 + 7];
    const sx = 32 / Number(width);
    const sy = 32 / Number(height);
    return {
      file: path.join(DATA_DIR, file),
      classId: Number(classId),
      signBox: {
        top: Math.floor(Number(y1) * sy),
        left: Math.floor(Number(x1) * sx),
        bottom: Math.ceil((Number(y2) + 1) * sy),
        right: Math.ceil((Number(x2) + 1) * sx),
      },
    };
  });
}

function areaShare(box: PixelBox): number {
  return ((box.bottom - box.top) * (box.right - box.left)) / (32 * 32);
}

function argMax(values: Float32Array): number {
  let best = 0;
  for (let i = 1; i < values.length; i++)
    if (values[i] > values[best]) best = i;
  return best;
}

/** Shrinks the image to 16x16 into the lower right quadrant, on its mean colour. */
function moveToLowerRight(image: Float32Array): Float32Array {
  const mean = [0, 1, 2].map((c) => {
    let sum = 0;
    for (let p = 0; p < 1024; p++) sum += image[p * 3 + c];
    return sum / 1024;
  });
  const moved = new Float32Array(image.length);
  for (let p = 0; p < 1024; p++) moved.set(mean, p * 3);
  for (let y = 0; y < 16; y++) {
    for (let x = 0; x < 16; x++) {
      for (let c = 0; c < 3; c++) {
        let sum = 0;
        for (const [dy, dx] of [
          [0, 0],
          [0, 1],
          [1, 0],
          [1, 1],
        ]) {
          sum += image[((2 * y + dy) * 32 + 2 * x + dx) * 3 + c];
        }
        moved[((16 + y) * 32 + 16 + x) * 3 + c] = sum / 4;
      }
    }
  }
  return moved;
}

/**
 * Recovers the heat of each model pixel from the PNG: the right half is
 * (1 - a) * image + a * colour(h) with a = 0.25 + 0.5 h, so the h on a
 * grid of 101 values that best reproduces the pixel is its heat. Scale 8.
 */
async function heatFromPng(file: string): Promise<Float32Array> {
  const { data, info } = await sharp(file)
    .raw()
    .toBuffer({ resolveWithObject: true });
  const heat = new Float32Array(32 * 32);
  for (let my = 0; my < 32; my++) {
    for (let mx = 0; mx < 32; mx++) {
      const y = my * 8 + 4;
      const x = mx * 8 + 4;
      const left = (y * info.width + x) * info.channels;
      const right = (y * info.width + 256 + x) * info.channels;
      let best = 0;
      let bestError = Infinity;
      for (let step = 0; step <= 100; step++) {
        const h = step / 100;
        const colour = [
          Math.min(1, 2 * h) * 255,
          Math.max(0, 2 * h - 1) * 255,
          Math.max(0, 0.5 - h) * 255,
        ];
        const alpha = 0.25 + 0.5 * h;
        let error = 0;
        for (let c = 0; c < 3; c++) {
          const expected = (1 - alpha) * data[left + c] + alpha * colour[c];
          error += (expected - data[right + c]) ** 2;
        }
        if (error < bestError) [best, bestError] = [h, error];
      }
      heat[my * 32 + mx] = best;
    }
  }
  return heat;
}

let workDir: string;
let modelFile: string;
let onnx: Uint8Array;

before(() => {
  workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-explain-'));
  onnx = exportOnnx(readWeightsFile(BASE_WEIGHTS));
  modelFile = path.join(workDir, 'base.onnx');
  writeFileSync(modelFile, onnx);
});

after(() => {
  if (workDir !== undefined) rmSync(workDir, { recursive: true, force: true });
});

describe('patchOrigins', () => {
  test('stride dividing the range', () => {
    assert.deepEqual(patchOrigins(8, 8), [0, 8, 16, 24]);
  });

  test('last patch touches far edge', () => {
    assert.deepEqual(patchOrigins(5, 4), [0, 4, 8, 12, 16, 20, 24, 27]);
  });

  test('whole-image patch has one origin', () => {
    assert.deepEqual(patchOrigins(32, 1), [0]);
  });
});

describe('occlusion on real signs', () => {
  let classifier: OnnxClassifier;
  const images = (): SignImage[] => readSignImages();

  before(async () => {
    classifier = await OnnxClassifier.create(onnx);
  });

  after(async () => {
    await classifier?.close();
  });

  // Measured with the base model, patch 8, stride 2 and log-odds on all
  // 2,150 gtsrb32 test images: the centre held 0.58 of the heat on
  // average (median 0.59, 10th percentile 0.38). 51 images (2.4%) were at
  // or below the 0.25 area share. The ten images here hold 0.44 to 0.81,
  // mean 0.62, so the checks leave room for small numeric changes only.
  test('heat concentrates in image centre', async () => {
    const shares: number[] = [];
    for (const sign of images()) {
      const image = await decodeImageFile(sign.file);
      const predicted = argMax(await classifier.predict(image, 1));
      const map = await computeOcclusion(classifier, image, predicted);
      shares.push(heatShareInside(heatOf(map.drop), CENTRE));
    }

    for (const [index, share] of shares.entries()) {
      assert.ok(
        share > CENTRE_AREA_SHARE,
        `image ${index}: centre share ${share} <= ${CENTRE_AREA_SHARE}`,
      );
    }
    const mean = shares.reduce((sum, share) => sum + share, 0) / shares.length;
    assert.ok(mean > 0.45, `mean centre share ${mean} <= 0.45`);
  });

  // On 2,085 of the 2,150 test images (97%), the sign's box held more of
  // the heat than its share of the area, which is 0.60 on average. All ten
  // images here pass.
  test('heat lies inside sign box', async () => {
    for (const sign of images()) {
      const image = await decodeImageFile(sign.file);
      const predicted = argMax(await classifier.predict(image, 1));
      const map = await computeOcclusion(classifier, image, predicted);
      const share = heatShareInside(heatOf(map.drop), sign.signBox);

      assert.ok(
        share > areaShare(sign.signBox),
        `${sign.file}: ${share} of the heat in the sign box, which is ` +
          `${areaShare(sign.signBox)} of the image`,
      );
    }
  });

  // Control: the same check passes by location, not by a constant bias
  // to the centre. Measured shares in the lower right: 0.70 to 0.98.
  test('heat follows moved sign', async () => {
    for (const sign of images().slice(0, 5)) {
      const moved = moveToLowerRight(await decodeImageFile(sign.file));
      const predicted = argMax(await classifier.predict(moved, 1));
      const map = await computeOcclusion(classifier, moved, predicted);
      const share = heatShareInside(heatOf(map.drop), LOWER_RIGHT);

      assert.ok(share > 0.5, `${sign.file} moved: ${share} in lower right`);
    }
  });

  test('probability score also centred', async () => {
    const sign = images()[0];
    const image = await decodeImageFile(sign.file);
    const predicted = argMax(await classifier.predict(image, 1));

    const map = await computeOcclusion(classifier, image, predicted, {
      score: 'probability',
      patchSize: 6,
      stride: 3,
    });

    assert.equal(map.patchCount, 10 * 10);
    assert.ok(heatShareInside(heatOf(map.drop), CENTRE) > CENTRE_AREA_SHARE);
  });

  test('bad options raise RangeError', async () => {
    const image = await decodeImageFile(images()[0].file);
    const cases = [
      { patchSize: 0 },
      { patchSize: 33 },
      { patchSize: 2.5 },
      { patchSize: 8, stride: 9 },
      { fill: 1.5 },
      { score: 'gradient' as 'log-odds' },
    ];
    for (const options of cases) {
      await assert.rejects(
        computeOcclusion(classifier, image, 0, options),
        RangeError,
        JSON.stringify(options),
      );
    }
    await assert.rejects(computeOcclusion(classifier, image, NUM_CLASSES), {
      name: 'RangeError',
      message: /class id is 43, expected an integer from 0 to 42/,
    });
  });
});

describe('explainImageFile', () => {
  test('PNG heat highlights the sign', async () => {
    const sign = readSignImages()[2];
    const out = path.join(workDir, 'sign.png');

    const result = await explainImageFile({
      image: sign.file,
      modelPath: modelFile,
      outPath: out,
    });

    const metadata = await sharp(out).metadata();
    assert.equal(metadata.format, 'png');
    assert.equal(metadata.width, 512);
    assert.equal(metadata.height, 256);
    const share = heatShareInside(await heatFromPng(out), CENTRE);
    assert.ok(share > CENTRE_AREA_SHARE, `PNG centre share ${share}`);
    assert.equal(result.explainedClass.classId, result.top[0].classId);
    assert.equal(result.top.length, 5);
    assert.equal(result.patchCount, 13 * 13);
  });

  test('missing image is DATA_NOT_FOUND', async () => {
    await assert.rejects(
      explainImageFile({
        image: path.join(workDir, 'absent.ppm'),
        modelPath: modelFile,
        outPath: path.join(workDir, 'absent.png'),
      }),
      (err: unknown) => isFleetError(err, ErrorCode.DataNotFound),
    );
  });

  test('text file is INVALID_IMAGE', async () => {
    const text = path.join(workDir, 'notes.png');
    writeFileSync(text, 'not an image\n');

    await assert.rejects(
      explainImageFile({
        image: text,
        modelPath: modelFile,
        outPath: path.join(workDir, 'notes-heat.png'),
      }),
      (err: unknown) => isFleetError(err, ErrorCode.InvalidImage),
    );
  });

  test('bad patch size raises RangeError', async () => {
    await assert.rejects(
      explainImageFile({
        image: readSignImages()[0].file,
        modelPath: modelFile,
        outPath: path.join(workDir, 'never.png'),
        patchSize: 40,
      }),
      {
        name: 'RangeError',
        message: /patch size is 40, expected an integer from 1 to 32/,
      },
    );
  });

  test('missing output folder is INVALID_CONFIG', async () => {
    await assert.rejects(
      explainImageFile({
        image: readSignImages()[0].file,
        modelPath: modelFile,
        outPath: path.join(workDir, 'no-such-dir', 'heat.png'),
      }),
      (err: unknown) =>
        isFleetError(err, ErrorCode.InvalidConfig) &&
        /no-such-dir/.test(err.message),
    );
  });
});

interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

function runExplain(args: string[]): CliResult {
  const result = spawnSync(
    process.execPath,
    ['--import', 'tsx', 'vehicle-agent/main.ts', 'explain', ...args],
    { cwd: REPO_ROOT, encoding: 'utf8', timeout: 60_000 },
  );
  return {
    status: result.status,
    stdout: result.stdout,
    stderr: result.stderr,
  };
}

describe('explain command', () => {
  let stateDir: string;

  before(async () => {
    stateDir = path.join(workDir, 'vehicle');
    const deployment = new ModelDeployment(
      stateDir,
      createLogger({ level: 'silent' }),
    );
    await deployment.deploy({
      modelName: MODEL_NAME,
      version: 4,
      sha256: sha256Hex(onnx),
      onnx,
    });
    await deployment.close();
  });

  test('deployed model writes PNG and JSON', async () => {
    const sign = readSignImages()[0];
    const out = path.join(workDir, 'cli.png');

    const result = runExplain([
      sign.file,
      '--out',
      out,
      '--state-dir',
      stateDir,
      '--top',
      '3',
      '--scale',
      '4',
    ]);

    assert.equal(result.status, 0, result.stderr);
    const printed = JSON.parse(result.stdout);
    assert.equal(printed.modelVersion, 4);
    assert.equal(printed.heatMap, out);
    assert.equal(printed.top.length, 3);
    assert.equal(printed.top[0].classId, sign.classId);
    assert.equal(typeof printed.top[0].name, 'string');
    const metadata = await sharp(out).metadata();
    assert.equal(metadata.width, 256);
    assert.equal(metadata.height, 128);
  });

  test('missing image exits 1', () => {
    const missing = path.join(workDir, 'missing.ppm');

    const result = runExplain([
      missing,
      '--out',
      path.join(workDir, 'm.png'),
      '--model',
      modelFile,
    ]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /cannot read image .*missing\.ppm \(ENOENT\)/);
  });

  test('non-image file exits 1', () => {
    const result = runExplain([
      path.join(DATA_DIR, 'test.csv'),
      '--out',
      path.join(workDir, 'csv.png'),
      '--model',
      modelFile,
    ]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /invalid image .*test\.csv/);
  });

  test('patch size zero rejected', () => {
    const result = runExplain([
      readSignImages()[0].file,
      '--out',
      path.join(workDir, 'zero.png'),
      '--model',
      modelFile,
      '--patch-size',
      '0',
    ]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /--patch-size.*expected a positive integer/);
  });

  test('stride above patch rejected', () => {
    const result = runExplain([
      readSignImages()[0].file,
      '--out',
      path.join(workDir, 'stride.png'),
      '--model',
      modelFile,
      '--patch-size',
      '4',
      '--stride',
      '5',
    ]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /stride is 5, expected an integer from 1 to 4/);
  });

  test('model source required once', () => {
    const result = runExplain([
      readSignImages()[0].file,
      '--out',
      path.join(workDir, 'none.png'),
    ]);

    assert.equal(result.status, 1);
    assert.match(result.stderr, /exactly one of --state-dir DIR and --model/);
  });

  test('bad fill and class rejected', () => {
    const base = [
      readSignImages()[0].file,
      '--out',
      path.join(workDir, 'fill.png'),
      '--model',
      modelFile,
    ];

    const fill = runExplain([...base, '--fill', 'black']);
    const classId = runExplain([...base, '--class', '43']);

    assert.equal(fill.status, 1);
    assert.match(fill.stderr, /--fill.*expected mean or a number in \[0, 1\]/);
    assert.equal(classId.status, 1);
    assert.match(classId.stderr, /--class.*from 0 to 42, got 43/);
  });
});
