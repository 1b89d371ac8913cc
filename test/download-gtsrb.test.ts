import assert from 'node:assert/strict';
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import {
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  rm,
  stat,
  writeFile,
} from 'node:fs/promises';
import { createServer, type RequestListener, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { pino } from 'pino';
import sharp from 'sharp';
import yazl from 'yazl';

import { loadLabelledImages } from '../models/dataset.ts';
import { encodePpm, parsePpm } from '../models/ppm.ts';
import { createLogger } from '../protocol/logger.ts';
import { ErrorCode, FleetError } from '../protocol/errors.ts';
import { downloadGtsrb, GTSRB_ARCHIVES } from '../scripts/download-gtsrb.ts';

const REPO_ROOT = resolve(fileURLToPath(import.meta.url), '..', '..');
const DATA_DIR =
  process.env.FLEETLEARN_DATA ??
  resolve(REPO_ROOT, '..', 'shared', 'data', 'gtsrb32');
const SCRIPT = join(REPO_ROOT, 'scripts', 'download-gtsrb.ts');
const GT_HEADER = 'Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId';
const SIZES = [
  [40, 44],
  [53, 50],
  [32, 32],
  [61, 57],
];
const TRAIN_CLASSES = ['00000', '00014'];
const TEST_LABELS = [14, 0, 14];
const silentLog = createLogger({ level: 'silent' });

let scratch: string;
let server: Server;
let baseUrl: string;
const archives = new Map<string, Buffer>();
const requests: { url: string; range?: string }[] = [];
let checksums: Record<string, string>;

/** Returns a real GTSRB image, resized to `width` x `height`, as PPM. */
async function resizedPpm(
  source: string,
  width: number,
  height: number,
): Promise<Buffer> {
  const { rgb } = parsePpm(await readFile(source));
  const resized = await sharp(rgb, {
    raw: { width: 32, height: 32, channels: 3 },
  })
    .resize(width, height, { fit: 'fill' })
    .raw()
    .toBuffer();
  return encodePpm(width, height, resized);
}

function zipEntries(entries: [string, Buffer][]): Promise<Buffer> {
  const zip = new yazl.ZipFile();
  for (const [name, bytes] of entries) zip.addBuffer(bytes, name);
  zip.end();
  const chunks: Buffer[] = [];
  return new Promise((resolvePromise, reject) => {
    zip.outputStream.on('data', (chunk: Buffer) => chunks.push(chunk));
    zip.outputStream.on('end', () => resolvePromise(Buffer.concat(chunks)));
    zip.outputStream.on('error', reject);
  });
}

/** Builds the training zip in the layout of GTSRB-Training_fixed.zip. */
async function buildTrainingZip(): Promise<Buffer> {
  const entries: [string, Buffer][] = [['GTSRB/Readme.txt', Buffer.from('x')]];
  for (const classFolder of TRAIN_CLASSES) {
    const sources = (await readdir(join(DATA_DIR, 'train', classFolder)))
      .sort()
      .slice(0, SIZES.length);
    const rows = [GT_HEADER];
    for (const [index, file] of sources.entries()) {
      const [width, height] = SIZES[index];
      const source = join(DATA_DIR, 'train', classFolder, file);
      const name = `GTSRB/Training/${classFolder}/${file}`;
      entries.push([name, await resizedPpm(source, width, height)]);
      rows.push(
        `${file};${width};${height};5;5;${width - 5};${height - 5};${Number(classFolder)}`,
      );
    }
    const csvName = `GTSRB/Training/${classFolder}/GT-${classFolder}.csv`;
    entries.push([csvName, Buffer.from(rows.join('\n') + '\n')]);
  }
  return zipEntries(entries);
}

/** Builds the test image zip and the ground-truth zip. */
async function buildTestZips(): Promise<[Buffer, Buffer]> {
  const testFiles = (await readdir(join(DATA_DIR, 'test'))).sort();
  const images: [string, Buffer][] = [];
  const rows = [GT_HEADER];
  for (const [index, label] of TEST_LABELS.entries()) {
    const [width, height] = SIZES[index];
    const name = `${String(index).padStart(5, '0')}.ppm`;
    const source = join(DATA_DIR, 'test', testFiles[index]);
    images.push([
      `GTSRB/Final_Test/Images/${name}`,
      await resizedPpm(source, width, height),
    ]);
    rows.push(
      `${name};${width};${height};5;5;${width - 5};${height - 5};${label}`,
    );
  }
  const unlabelled = rows.map((row) => row.split(';').slice(0, 7).join(';'));
  images.push([
    'GTSRB/Final_Test/Images/GT-final_test.test.csv',
    Buffer.from(unlabelled.join('\n')),
  ]);
  const labels = Buffer.from(rows.join('\n') + '\n');
  return [
    await zipEntries(images),
    await zipEntries([['GT-final_test.csv', labels]]),
  ];
}

function md5(bytes: Buffer): string {
  return createHash('md5').update(bytes).digest('hex');
}

/** Serves `files` under /gtsrb/, honouring `Range: bytes=N-`. */
function startServer(files = archives): Promise<Server> {
  const httpServer = createServer((request, response) => {
    requests.push({ url: request.url ?? '', range: request.headers.range });
    const name = (request.url ?? '').replace(/^\/gtsrb\//, '');
    const body = files.get(name);
    if (!request.url?.startsWith('/gtsrb/') || body === undefined) {
      response.writeHead(404).end('not found');
      return;
    }
    const range = /^bytes=(\d+)-$/.exec(request.headers.range ?? '');
    const start = range ? Number(range[1]) : 0;
    const headers = { 'content-length': body.length - start };
    if (range) {
      const contentRange = `bytes ${start}-${body.length - 1}/${body.length}`;
      response.writeHead(206, { ...headers, 'content-range': contentRange });
    } else {
      response.writeHead(200, headers);
    }
    response.end(body.subarray(start));
  });
  return new Promise((resolveServer) => {
    httpServer.listen(0, '127.0.0.1', () => resolveServer(httpServer));
  });
}

/** Starts a server on 127.0.0.1 port 0 and returns it with its base URL. */
async function listen(
  handler: RequestListener,
): Promise<{ server: Server; url: string }> {
  const httpServer = createServer(handler);
  await new Promise<void>((done) => httpServer.listen(0, '127.0.0.1', done));
  const { port } = httpServer.address() as AddressInfo;
  return { server: httpServer, url: `http://127.0.0.1:${port}/` };
}

async function stopServer(httpServer: Server): Promise<void> {
  httpServer.closeAllConnections();
  await new Promise((done) => httpServer.close(done));
}

/** Returns a pino logger whose JSON lines are collected in `lines`. */
function capturingLogger(lines: Record<string, unknown>[]) {
  const stream = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      for (const line of chunk.toString().split('\n')) {
        if (line !== '') lines.push(JSON.parse(line));
      }
      callback();
    },
  });
  return pino({ level: 'info' }, stream);
}

/** Returns the pid of a process that has exited. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ['-e', '']);
  assert.equal(typeof child.pid, 'number');
  return child.pid!;
}

function runScript(args: string[]) {
  return promisify(execFile)(
    process.execPath,
    ['--import', 'tsx', SCRIPT, ...args],
    {
      cwd: REPO_ROOT,
    },
  );
}

before(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'fleetlearn-download-'));
  const [testImages, testLabels] = await buildTestZips();
  archives.set(GTSRB_ARCHIVES.train.name, await buildTrainingZip());
  archives.set(GTSRB_ARCHIVES.testImages.name, testImages);
  archives.set(GTSRB_ARCHIVES.testLabels.name, testLabels);
  checksums = Object.fromEntries(
    [...archives].map(([name, bytes]) => [name, md5(bytes)]),
  );
  server = await startServer();
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}/gtsrb/`;
});

after(async () => {
  await new Promise((done) => server.close(done));
  await rm(scratch, { recursive: true, force: true });
});

describe('download-gtsrb', () => {
  test('CLI converts archives to gtsrb32', async () => {
    const out = join(scratch, 'cli', 'gtsrb32-full');
    const checksumsFile = join(scratch, 'checksums.json');
    await writeFile(checksumsFile, JSON.stringify(checksums));

    await runScript([
      '--base-url',
      baseUrl,
      '--out',
      out,
      '--download-dir',
      join(scratch, 'cli', 'downloads'),
      '--checksums',
      checksumsFile,
    ]);

    const trainSet = await loadLabelledImages(out);
    assert.equal(trainSet.count, TRAIN_CLASSES.length * SIZES.length);
    assert.deepEqual(Array.from(trainSet.labels), [0, 0, 0, 0, 14, 14, 14, 14]);
    assert.match(trainSet.tracks[0], /^00000_\d{5}$/);
    const testSet = await loadLabelledImages(out, { split: 'test' });
    assert.deepEqual(Array.from(testSet.labels), TEST_LABELS);
    for (const path of [...trainSet.paths, ...testSet.paths]) {
      const ppm = parsePpm(await readFile(path));
      assert.equal(ppm.width, 32, path);
      assert.equal(ppm.height, 32, path);
    }
    const trainCsv = (await readFile(join(out, 'train.csv'), 'utf8')).split(
      '\n',
    );
    assert.equal(
      trainCsv[0],
      'Path;OrigWidth;OrigHeight;OrigRoi.X1;OrigRoi.Y1;OrigRoi.X2;OrigRoi.Y2;ClassId',
    );
    assert.match(
      trainCsv[1],
      /^train\/00000\/\d{5}_\d{5}\.ppm;40;44;5;5;35;39;0$/,
    );
    const signNames = await readFile(join(out, 'signnames.csv'), 'utf8');
    assert.match(signNames, /^14;Stop$/m);
    const siblings = await readdir(join(scratch, 'cli'));
    assert.deepEqual(siblings.sort(), ['downloads', 'gtsrb32-full']);
  });

  test('verified archives not fetched again', async () => {
    const downloadDir = join(scratch, 'again', 'downloads');
    const options = { baseUrl, downloadDir, checksums, log: silentLog };
    await downloadGtsrb({ ...options, outDir: join(scratch, 'again', 'a') });
    const before = requests.length;

    const result = await downloadGtsrb({
      ...options,
      outDir: join(scratch, 'again', 'b'),
    });

    assert.equal(requests.length, before);
    assert.equal(result.trainCount, 8);
    assert.equal(result.testCount, 3);
  });

  test('partial download resumed', async () => {
    const downloadDir = join(scratch, 'resume', 'downloads');
    const name = GTSRB_ARCHIVES.train.name;
    await mkdir(downloadDir, { recursive: true });
    const half = archives.get(name)!.subarray(0, 1000);
    await writeFile(join(downloadDir, `${name}.part`), half);
    const outDir = join(scratch, 'resume', 'out');

    await downloadGtsrb({
      baseUrl,
      downloadDir,
      outDir,
      checksums,
      log: silentLog,
    });

    const archiveRequests = requests.filter((r) => r.url.endsWith(name));
    assert.equal(archiveRequests.at(-1)?.range, 'bytes=1000-');
    assert.equal((await loadLabelledImages(outDir)).count, 8);
  });

  test('existing output kept without force', async () => {
    const outDir = join(scratch, 'resume', 'out');

    const result = await downloadGtsrb({
      baseUrl,
      downloadDir: join(scratch, 'resume', 'downloads'),
      outDir,
      checksums,
      log: silentLog,
    });

    assert.equal(result.wasPresent, true);
  });

  test('checksum mismatch rejected', async () => {
    const downloadDir = join(scratch, 'mismatch', 'downloads');
    const outDir = join(scratch, 'mismatch', 'out');
    const name = GTSRB_ARCHIVES.testLabels.name;
    const wrong = { ...checksums, [name]: '0'.repeat(32) };

    await assert.rejects(
      downloadGtsrb({
        baseUrl,
        downloadDir,
        outDir,
        checksums: wrong,
        log: silentLog,
      }),
      (err: unknown) => {
        assert.ok(err instanceof FleetError);
        assert.equal(err.code, ErrorCode.DigestMismatch);
        assert.match(err.message, new RegExp(name.replace('.', '\\.')));
        assert.match(err.message, /0{32}/);
        assert.match(err.message, new RegExp(checksums[name]));
        return true;
      },
    );
    assert.equal(existsSync(outDir), false);
    assert.equal(existsSync(join(downloadDir, `${name}.part`)), false);
  });

  test('HTTP 404 rejected', async () => {
    const outDir = join(scratch, 'missing', 'out');

    await assert.rejects(
      downloadGtsrb({
        baseUrl: baseUrl.replace('/gtsrb/', '/nothing/'),
        downloadDir: join(scratch, 'missing', 'downloads'),
        outDir,
        checksums,
        log: silentLog,
      }),
      (err: unknown) => {
        assert.ok(err instanceof FleetError);
        assert.equal(err.code, ErrorCode.DataNotFound);
        assert.match(err.message, /404/);
        return true;
      },
    );
    assert.equal(existsSync(outDir), false);
  });

  test('refused connection rejected', async () => {
    const closed = await startServer();
    const { port } = closed.address() as AddressInfo;
    await new Promise((done) => closed.close(done));

    await assert.rejects(
      downloadGtsrb({
        baseUrl: `http://127.0.0.1:${port}/gtsrb/`,
        downloadDir: join(scratch, 'refused', 'downloads'),
        outDir: join(scratch, 'refused', 'out'),
        log: silentLog,
      }),
      (err: unknown) => {
        assert.ok(err instanceof FleetError);
        assert.equal(err.code, ErrorCode.DataNotFound);
        assert.match(err.message, /ECONNREFUSED/);
        return true;
      },
    );
  });

  test('interrupted download keeps part', async () => {
    const cutting = createServer((_request, response) => {
      response.writeHead(200, { 'content-length': 100000 });
      // Cut the connection only after the client had time to write the
      // first bytes, so the part file exists even on a loaded machine.
      response.write(Buffer.alloc(5000, 1), () =>
        setTimeout(() => response.destroy(), 300),
      );
    });
    await new Promise<void>((done) => cutting.listen(0, '127.0.0.1', done));
    const { port } = cutting.address() as AddressInfo;
    const downloadDir = join(scratch, 'cut', 'downloads');
    let message = '';

    try {
      await assert.rejects(
        downloadGtsrb({
          baseUrl: `http://127.0.0.1:${port}/`,
          downloadDir,
          outDir: join(scratch, 'cut', 'out'),
          log: silentLog,
        }),
        (err: unknown) => {
          assert.ok(err instanceof FleetError);
          assert.equal(err.code, ErrorCode.DataNotFound);
          assert.match(err.message, /interrupted/);
          message = err.message;
          return true;
        },
      );
    } finally {
      await new Promise((done) => cutting.close(done));
    }
    const part = join(downloadDir, `${GTSRB_ARCHIVES.train.name}.part`);
    assert.equal(existsSync(part), true);
    const onDisk = (await stat(part)).size;
    assert.ok(message.includes(`${part} contains ${onDisk} bytes`), message);
  });

  test('CLI exits non-zero on mismatch', async () => {
    const checksumsFile = join(scratch, 'wrong.json');
    const name = GTSRB_ARCHIVES.train.name;
    await writeFile(checksumsFile, JSON.stringify({ [name]: 'f'.repeat(32) }));

    await assert.rejects(
      runScript([
        '--base-url',
        baseUrl,
        '--out',
        join(scratch, 'cli-bad', 'out'),
        '--download-dir',
        join(scratch, 'cli-bad', 'downloads'),
        '--checksums',
        checksumsFile,
      ]),
      (err: { code?: number; stderr?: string }) => {
        assert.equal(err.code, 1);
        assert.match(
          err.stderr ?? '',
          /checksum mismatch for GTSRB-Training_fixed\.zip/,
        );
        assert.match(err.stderr ?? '', new RegExp(checksums[name]));
        return true;
      },
    );
  });
  test('idle server times out', async () => {
    const { server: idle, url } = await listen((_request, response) => {
      response.writeHead(200, { 'content-length': 100000 });
      response.write(Buffer.alloc(700, 1));
    });
    const downloadDir = join(scratch, 'idle', 'downloads');
    const part = join(downloadDir, `${GTSRB_ARCHIVES.train.name}.part`);
    const startedAt = performance.now();

    try {
      await assert.rejects(
        downloadGtsrb({
          baseUrl: url,
          downloadDir,
          outDir: join(scratch, 'idle', 'out'),
          idleTimeoutMs: 300,
          log: silentLog,
        }),
        (err: unknown) => {
          assert.ok(err instanceof FleetError);
          assert.equal(err.code, ErrorCode.DataNotFound);
          assert.ok(err.message.includes(`${url}${GTSRB_ARCHIVES.train.name}`));
          assert.match(err.message, /no data for 300 ms/);
          assert.match(err.message, /--idle-timeout-ms/);
          assert.match(err.message, /contains 700 bytes/);
          return true;
        },
      );
    } finally {
      await stopServer(idle);
    }
    assert.ok(performance.now() - startedAt < 5000);
    assert.equal((await stat(part)).size, 700);
  });

  test('missing headers time out', async () => {
    const { server: silent, url } = await listen(() => {});
    const startedAt = performance.now();

    try {
      await assert.rejects(
        downloadGtsrb({
          baseUrl: url,
          downloadDir: join(scratch, 'silent', 'downloads'),
          outDir: join(scratch, 'silent', 'out'),
          connectTimeoutMs: 300,
          log: silentLog,
        }),
        (err: unknown) => {
          assert.ok(err instanceof FleetError);
          assert.equal(err.code, ErrorCode.DataNotFound);
          assert.ok(err.message.includes(`${url}${GTSRB_ARCHIVES.train.name}`));
          assert.match(err.message, /no response headers within 300 ms/);
          assert.match(err.message, /--connect-timeout-ms/);
          return true;
        },
      );
    } finally {
      await stopServer(silent);
    }
    assert.ok(performance.now() - startedAt < 5000);
  });

  test('progress logged without terminal', async () => {
    const { server: slow, url } = await listen((_request, response) => {
      response.writeHead(200, { 'content-length': 100000 });
      let sent = 0;
      const timer = setInterval(() => {
        sent += 1;
        if (sent > 12) {
          clearInterval(timer);
          response.destroy();
          return;
        }
        response.write(Buffer.alloc(10, 1));
      }, 50);
    });
    const lines: Record<string, unknown>[] = [];

    try {
      await assert.rejects(
        downloadGtsrb({
          baseUrl: url,
          downloadDir: join(scratch, 'slow', 'downloads'),
          outDir: join(scratch, 'slow', 'out'),
          showProgress: false,
          progressIntervalMs: 100,
          log: capturingLogger(lines),
        }),
        FleetError,
      );
    } finally {
      await stopServer(slow);
    }
    const progress = lines.filter(
      (line) => line.msg === 'archive download progress',
    );
    assert.ok(progress.length >= 2, `${progress.length} progress lines`);
    assert.equal(progress.at(-1)?.totalBytes, 100000);
    assert.ok(Number(progress.at(-1)?.bytes) > 0);
  });

  test('invalid zip names archive', async () => {
    const name = GTSRB_ARCHIVES.train.name;
    const valid = archives.get(name)!;
    const cases = [
      ['garbage', Buffer.alloc(5000, 7)],
      ['truncated', valid.subarray(0, Math.floor(valid.length / 2))],
    ] as const;

    for (const [label, bytes] of cases) {
      const files = new Map(archives).set(name, bytes);
      const bad = await startServer(files);
      const port = (bad.address() as AddressInfo).port;
      const downloadDir = join(scratch, label, 'downloads');
      const outDir = join(scratch, label, 'out');
      try {
        await assert.rejects(
          downloadGtsrb({
            baseUrl: `http://127.0.0.1:${port}/gtsrb/`,
            downloadDir,
            outDir,
            checksums: { ...checksums, [name]: md5(bytes) },
            log: silentLog,
          }),
          (err: unknown) => {
            assert.ok(err instanceof FleetError, label);
            assert.equal(err.code, ErrorCode.DataNotFound, label);
            assert.ok(err.message.includes(join(downloadDir, name)), label);
            assert.match(err.message, /delete it/, label);
            assert.match(err.message, /--force/, label);
            return true;
          },
        );
      } finally {
        await stopServer(bad);
      }
      assert.deepEqual(await readdir(join(scratch, label)), ['downloads']);
    }
  });

  test('stale partial folders removed', async () => {
    const parent = join(scratch, 'stale');
    const dead = join(parent, `out.partial-${deadPid()}`);
    const live = join(parent, `out.partial-${process.ppid}`);
    await mkdir(dead, { recursive: true });
    await writeFile(join(dead, 'train.csv'), 'x');
    await mkdir(live, { recursive: true });

    await downloadGtsrb({
      baseUrl,
      downloadDir: join(parent, 'downloads'),
      outDir: join(parent, 'out'),
      checksums,
      log: silentLog,
    });

    assert.equal(existsSync(dead), false);
    assert.equal(existsSync(live), true);
    assert.equal(existsSync(join(parent, 'out', 'train.csv')), true);
  });

  test('SIGINT removes partial dataset', async () => {
    const name = GTSRB_ARCHIVES.train.name;
    const image = await resizedPpm(
      join(DATA_DIR, 'test', (await readdir(join(DATA_DIR, 'test')))[0]),
      48,
      48,
    );
    const entries: [string, Buffer][] = [];
    for (let i = 0; i < 3000; i += 1) {
      const frame = String(i).padStart(5, '0');
      entries.push([`GTSRB/Training/00001/00000_${frame}.ppm`, image]);
    }
    const big = await zipEntries(entries);
    const files = new Map(archives).set(name, big);
    const bigServer = await startServer(files);
    const port = (bigServer.address() as AddressInfo).port;
    const parent = join(scratch, 'sigint');
    const checksumsFile = join(scratch, 'sigint-checksums.json');
    await writeFile(
      checksumsFile,
      JSON.stringify({ ...checksums, [name]: md5(big) }),
    );

    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        SCRIPT,
        ...['--base-url', `http://127.0.0.1:${port}/gtsrb/`],
        ...['--out', join(parent, 'out')],
        ...['--download-dir', join(parent, 'downloads')],
        ...['--checksums', checksumsFile],
      ],
      { cwd: REPO_ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const partial = join(parent, `out.partial-${child.pid}`);
    const exited = new Promise<NodeJS.Signals | number | null>((done) => {
      child.on('exit', (code, signal) => done(signal ?? code));
    });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    try {
      let output = '';
      for await (const chunk of child.stdout) {
        output += String(chunk);
        if (output.includes('dataset conversion started')) break;
      }
      while (!existsSync(join(partial, 'train'))) {
        await new Promise((done) => setTimeout(done, 20));
      }
      // Ctrl-C reaches node again through npm and tsx, so send it twice.
      child.kill('SIGINT');
      setImmediate(() => child.kill('SIGINT'));

      assert.equal(await exited, 'SIGINT');
    } finally {
      child.kill('SIGKILL');
      await stopServer(bigServer);
    }
    assert.match(stderr, /stopped by SIGINT/);
    assert.equal(existsSync(partial), false);
    assert.deepEqual(await readdir(parent), ['downloads']);
  });
});
