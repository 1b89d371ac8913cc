import assert from 'node:assert/strict';
import { mkdtemp, mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import sharp from 'sharp';

import { className, CLASS_NAMES } from '../models/class-names.ts';
import {
  createRandom,
  decodeImageFile,
  dirichletSplit,
  loadLabelledImages,
  resolveDataDir,
  splitByTrack,
  subset,
  type LabelledImages,
} from '../models/dataset.ts';
import { encodePpm, parsePpm } from '../models/ppm.ts';
import { sampleGamma } from '../models/random.ts';
import { ErrorCode, FleetError } from '../protocol/errors.ts';

const REPO_ROOT = resolve(fileURLToPath(import.meta.url), '..', '..');
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  resolve(REPO_ROOT, '..', 'shared', 'data', 'gtsrb32');
const SAMPLE_PPM = join(DATA_DIR, 'train', '00014', '00000_00029.ppm');

let train: LabelledImages;
let scratch: string;

before(async () => {
  train = await loadLabelledImages(DATA_DIR);
  scratch = await mkdtemp(join(tmpdir(), 'fleetlearn-dataset-'));
});

after(async () => {
  await rm(scratch, { recursive: true, force: true });
});

function assertFleetError(code: string) {
  return (err: unknown) => {
    assert.ok(err instanceof FleetError, `expected FleetError, got ${err}`);
    assert.equal(err.code, code);
    return true;
  };
}

/** Returns the 32x32 RGB bytes of a real GTSRB image. */
async function sampleRgb(): Promise<Uint8Array> {
  return parsePpm(await readFile(SAMPLE_PPM)).rgb;
}

function classHistogram(data: LabelledImages): number[] {
  const counts = new Array<number>(43).fill(0);
  for (const label of data.labels) counts[label]++;
  return counts;
}

describe('loadLabelledImages', () => {
  test('gtsrb32 train split counts', () => {
    assert.equal(train.count, 4300);
    assert.equal(train.images.length, 4300 * 32 * 32 * 3);
    assert.equal(train.labels.length, 4300);
    assert.equal(train.paths.length, 4300);
    assert.deepEqual(classHistogram(train), new Array(43).fill(100));
    assert.equal(new Set(train.tracks).size, 1307);
    assert.match(train.tracks[0], /^\d{5}_\d{5}$/);
  });

  test('gtsrb32 test split counts', async () => {
    const testSet = await loadLabelledImages(DATA_DIR, { split: 'test' });

    assert.equal(testSet.count, 2150);
    assert.deepEqual(classHistogram(testSet), new Array(43).fill(50));
    assert.ok(testSet.tracks.every((track) => track === ''));
  });

  test('pixel values match PPM bytes', async () => {
    const rgb = await sampleRgb();
    const index = train.paths.indexOf(SAMPLE_PPM);

    assert.ok(index >= 0);
    assert.equal(train.labels[index], 14);
    assert.equal(train.tracks[index], '00014_00000');
    const values = train.images.subarray(index * 3072, (index + 1) * 3072);
    assert.deepEqual(
      Array.from(values),
      Array.from(rgb, (byte) => Math.fround(byte / 255)),
    );
  });

  test('limit spreads over classes', async () => {
    const limited = await loadLabelledImages(DATA_DIR, { limit: 430 });

    assert.equal(limited.count, 430);
    assert.deepEqual(classHistogram(limited), new Array(43).fill(10));
  });

  test('folder per class PNG and JPEG', async () => {
    const dir = join(scratch, 'per-class');
    const rgb = await sampleRgb();
    const raw = { raw: { width: 32, height: 32, channels: 3 as const } };
    await mkdir(join(dir, '14'), { recursive: true });
    await mkdir(join(dir, '00003'), { recursive: true });
    await sharp(rgb, raw)
      .png()
      .toFile(join(dir, '14', 'a_1.png'));
    await sharp(rgb, raw)
      .jpeg({ quality: 95 })
      .toFile(join(dir, '14', 'b.jpg'));
    await sharp(rgb, raw)
      .jpeg()
      .toFile(join(dir, '00003', 'c.jpeg'));
    await writeFile(join(dir, '14', 'notes.txt'), 'not an image');

    const data = await loadLabelledImages(dir);

    assert.equal(data.count, 3);
    assert.deepEqual(Array.from(data.labels), [3, 14, 14]);
    assert.deepEqual(data.tracks, ['', '14_a', '']);
    const png = data.images.subarray(3072, 6144);
    assert.deepEqual(
      Array.from(png),
      Array.from(rgb, (byte) => Math.fround(byte / 255)),
    );
    const jpeg = data.images.subarray(6144, 9216);
    const maxDiff = Math.max(
      ...Array.from(jpeg, (value, i) => Math.abs(value - rgb[i] / 255)),
    );
    assert.ok(maxDiff < 0.25, `JPEG differs by ${maxDiff}`);
  });

  test('larger images resized to 32x32', async () => {
    const dir = join(scratch, 'resize');
    await mkdir(join(dir, '14'), { recursive: true });
    const rgb = await sampleRgb();
    const raw = { raw: { width: 32, height: 32, channels: 3 as const } };
    const big = await sharp(rgb, raw)
      .resize(64, 48, { fit: 'fill' })
      .raw()
      .toBuffer();
    await writeFile(join(dir, '14', 'big.ppm'), encodePpm(64, 48, big));
    await sharp(big, { raw: { width: 64, height: 48, channels: 3 } })
      .png()
      .toFile(join(dir, '14', 'big.png'));

    const data = await loadLabelledImages(dir);

    assert.equal(data.count, 2);
    assert.equal(data.images.length, 2 * 3072);
    for (let i = 0; i < 3072; i++) {
      assert.ok(Math.abs(data.images[i] - data.images[3072 + i]) < 1e-6);
    }
    const meanDiff =
      data.images
        .subarray(0, 3072)
        .reduce((sum, value, i) => sum + Math.abs(value - rgb[i] / 255), 0) /
      3072;
    assert.ok(
      meanDiff < 0.1,
      `resized image differs by ${meanDiff} on average`,
    );
  });

  test('PPM header comments skipped', async () => {
    const path = join(scratch, 'comment.ppm');
    const rgb = await sampleRgb();
    const header = Buffer.from('P6\n# a comment\n32 # width\n32\n255\n');
    await writeFile(path, Buffer.concat([header, rgb]));

    const values = await decodeImageFile(path);

    assert.equal(values.length, 3072);
    assert.equal(values[0], Math.fround(rgb[0] / 255));
  });

  test('truncated PPM rejected', async () => {
    const dir = join(scratch, 'truncated');
    await mkdir(join(dir, '5'), { recursive: true });
    const bytes = await readFile(SAMPLE_PPM);
    await writeFile(join(dir, '5', 'cut.ppm'), bytes.subarray(0, 1000));

    await assert.rejects(loadLabelledImages(dir), (err: unknown) => {
      assertFleetError(ErrorCode.InvalidImage)(err);
      assert.match((err as Error).message, /cut\.ppm/);
      assert.match((err as Error).message, /truncated/);
      return true;
    });
  });

  test('garbage PNG rejected', async () => {
    const path = join(scratch, 'garbage.png');
    const png = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    await writeFile(path, Buffer.concat([png, Buffer.alloc(64, 7)]));

    await assert.rejects(decodeImageFile(path), (err: unknown) => {
      assertFleetError(ErrorCode.InvalidImage)(err);
      assert.match((err as Error).message, /garbage\.png/);
      return true;
    });
  });

  test('missing directory rejected', async () => {
    const missing = join(scratch, 'does-not-exist');

    await assert.rejects(loadLabelledImages(missing), (err: unknown) => {
      assertFleetError(ErrorCode.DataNotFound)(err);
      assert.match((err as Error).message, /does-not-exist/);
      assert.match((err as Error).message, /download-data/);
      return true;
    });
  });

  test('empty directory rejected', async () => {
    const empty = join(scratch, 'empty');
    await mkdir(empty, { recursive: true });

    await assert.rejects(
      loadLabelledImages(empty),
      assertFleetError(ErrorCode.DataNotFound),
    );
  });

  test('class id out of range rejected', async () => {
    const dir = join(scratch, 'bad-class');
    await mkdir(join(dir, '43'), { recursive: true });
    await writeFile(join(dir, '43', 'x.ppm'), await readFile(SAMPLE_PPM));

    await assert.rejects(loadLabelledImages(dir), (err: unknown) => {
      assertFleetError(ErrorCode.DataNotFound)(err);
      assert.match((err as Error).message, /"43"/);
      return true;
    });
  });

  test('bad options rejected', async () => {
    await assert.rejects(
      loadLabelledImages(DATA_DIR, { limit: 0 }),
      RangeError,
    );
    await assert.rejects(
      loadLabelledImages(DATA_DIR, { split: 'val' as 'test' }),
      RangeError,
    );
  });
});

describe('resolveDataDir', () => {
  test('explicit flag wins', () => {
    assert.equal(resolveDataDir(DATA_DIR), DATA_DIR);
  });

  test('missing flag lists path', () => {
    const missing = join(scratch, 'nowhere');

    assert.throws(
      () => resolveDataDir(missing),
      (err: unknown) => {
        assertFleetError(ErrorCode.DataNotFound)(err);
        assert.match((err as Error).message, /nowhere/);
        return true;
      },
    );
  });

  test('environment variable used', () => {
    const saved = process.env.FLEETLEARN_DATA;
    process.env.FLEETLEARN_DATA = DATA_DIR;
    try {
      assert.equal(resolveDataDir(), DATA_DIR);
    } finally {
      if (saved === undefined) delete process.env.FLEETLEARN_DATA;
      else process.env.FLEETLEARN_DATA = saved;
    }
  });
});

describe('splits', () => {
  test('splitByTrack reproducible per seed', () => {
    const first = splitByTrack(train, 0.3, 42);
    const second = splitByTrack(train, 0.3, 42);
    const other = splitByTrack(train, 0.3, 43);

    assert.deepEqual(first.selected.paths, second.selected.paths);
    assert.notDeepEqual(first.selected.paths, other.selected.paths);
  });

  test('splitByTrack keeps tracks whole', () => {
    const { selected, rest } = splitByTrack(train, 0.3, 7);
    const selectedTracks = new Set(selected.tracks);
    const restTracks = new Set(rest.tracks);

    assert.equal(selected.count + rest.count, train.count);
    assert.ok(rest.tracks.every((track) => !selectedTracks.has(track)));
    const fraction =
      selectedTracks.size / (selectedTracks.size + restTracks.size);
    assert.ok(Math.abs(fraction - 0.3) < 0.05, `fraction ${fraction}`);
    assert.ok(classHistogram(selected).every((count) => count > 0));
  });

  test('dirichletSplit reproducible and disjoint', () => {
    const first = dirichletSplit(train, 8, 0.5, 3);
    const second = dirichletSplit(train, 8, 0.5, 3);

    assert.deepEqual(
      first.map((part) => part.paths),
      second.map((part) => part.paths),
    );
    assert.equal(
      first.reduce((sum, part) => sum + part.count, 0),
      train.count,
    );
    const owner = new Map<string, number>();
    first.forEach((part, index) => {
      assert.ok(part.count > 0, `part ${index} is empty`);
      for (const track of part.tracks) {
        assert.ok(
          (owner.get(track) ?? index) === index,
          `track ${track} split`,
        );
        owner.set(track, index);
      }
    });
  });

  test('dirichletSplit small alpha skews', () => {
    const classesPerPart = (alpha: number) =>
      dirichletSplit(train, 10, alpha, 11).map(
        (part) => classHistogram(part).filter((count) => count > 0).length,
      );
    const mean = (values: number[]) =>
      values.reduce((sum, value) => sum + value, 0) / values.length;

    const skewed = mean(classesPerPart(0.1));
    const balanced = mean(classesPerPart(100));

    assert.ok(skewed < 20, `alpha 0.1 gives ${skewed} classes per part`);
    assert.ok(balanced > 38, `alpha 100 gives ${balanced} classes per part`);
  });

  test('dirichletSplit rejects bad arguments', () => {
    assert.throws(() => dirichletSplit(train, 0, 1, 1), RangeError);
    assert.throws(() => dirichletSplit(train, 2, 0, 1), RangeError);
    assert.throws(() => dirichletSplit(train, 2000, 1, 1), RangeError);
  });

  test('subset copies selected images', () => {
    const picked = subset(train, [5, 0]);

    assert.equal(picked.count, 2);
    assert.equal(picked.paths[0], train.paths[5]);
    assert.deepEqual(
      picked.images.subarray(3072),
      train.images.subarray(0, 3072),
    );
    assert.throws(() => subset(train, [train.count]), RangeError);
  });
});

describe('random', () => {
  test('createRandom repeats per seed', () => {
    const a = createRandom(9);
    const b = createRandom(9);
    const values = Array.from({ length: 5 }, () => a());

    assert.deepEqual(
      values,
      Array.from({ length: 5 }, () => b()),
    );
    assert.ok(values.every((value) => value >= 0 && value < 1));
  });

  test('sampleGamma mean matches shape', () => {
    const random = createRandom(5);
    for (const shape of [0.3, 2.5]) {
      let sum = 0;
      for (let i = 0; i < 20000; i++) sum += sampleGamma(shape, random);

      const mean = sum / 20000;
      assert.ok(Math.abs(mean - shape) < 0.05 * shape + 0.02, `mean ${mean}`);
    }
  });
});

describe('className', () => {
  test('names the 43 classes', () => {
    assert.equal(CLASS_NAMES.length, 43);
    assert.equal(className(14), 'Stop');
    assert.throws(() => className(43), RangeError);
  });
});
