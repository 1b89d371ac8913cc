import assert from 'node:assert/strict';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import { after, describe, test } from 'node:test';
import { pino } from 'pino';
import {
  CompressionKind,
  decodeDeltaValues,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import {
  ErrorCode,
  TensorEncoding,
  createLogger,
  decodeModelUpdate,
  encodeFloat32Tensor,
  encodeModelUpdate,
  encodeModelWeights,
  isFleetError,
  type ModelUpdate,
  type RoundTask,
} from '../protocol/index.ts';
import {
  ErrorFeedback,
  MAX_RESIDUAL_ABS_VALUE,
  MAX_RESIDUAL_AGE_VERSIONS,
  compressDeltas,
  compressTrainingOutput,
} from '../vehicle-agent/error-feedback.ts';
import {
  encodeUpdatePayload,
  type RoundTrainingOutput,
} from '../vehicle-agent/trainer.ts';

const log = createLogger({ level: 'silent' });
const workDir = mkdtempSync(path.join(tmpdir(), 'fleetlearn-feedback-'));
after(() => rmSync(workDir, { recursive: true, force: true }));

const TOPK_QUARTER: UpdateCompression = {
  kind: CompressionKind.TopK,
  topkDensity: 0.25,
};
const FLOAT32: UpdateCompression = {
  kind: CompressionKind.Float32,
  topkDensity: 0,
};

function delta(values: number[]) {
  return {
    name: 'w',
    shape: [values.length],
    values: new Float32Array(values),
  };
}

function output(values: number[]): RoundTrainingOutput {
  const update: ModelUpdate = {
    updateId: 'u-1',
    vehicleId: 'veh-1',
    modelName: 'gtsrb-cnn',
    baseModelVersion: 2,
    round: 3,
    numExamples: 10,
    deltas: [encodeFloat32Tensor('w', [4], new Float32Array(values))],
    metrics: {
      trainLoss: 1,
      trainAccuracy: 0,
      trainDurationMs: 1,
      backend: 'cpu',
    },
    createdAtMs: 1,
  };
  return {
    update,
    payload: encodeModelUpdate(update),
    result: {} as RoundTrainingOutput['result'],
    fromLayer: 'dense1',
  };
}
function roundTask(compression: UpdateCompression | undefined): RoundTask {
  return {
    fleetId: 'f',
    round: 3,
    modelName: 'gtsrb-cnn',
    modelVersion: 2,
    selectedVehicles: [],
    training: {} as RoundTask['training'],
    openedAtMs: 1,
    deadlineMs: 0,
    minUpdates: 1,
    modelSha256: '',
    ...(compression === undefined ? {} : { compression }),
  };
}

describe('compressDeltas error feedback', () => {
  test('residual carries over two rounds', () => {
    // Round 1 sends the largest of four values (k = 1) and keeps the rest.
    const first = compressDeltas(
      [delta([4, -1, 0.5, 2])],
      TOPK_QUARTER,
      undefined,
    );

    assert.deepEqual(first.tensors[0].indices, [0]);
    assert.deepEqual([...decodeDeltaValues(first.tensors[0])], [4, 0, 0, 0]);
    assert.deepEqual([...first.residual.get('w')!], [0, -1, 0.5, 2]);

    // Round 2: delta + residual = [0, 0.5, 0.5, 3], so index 3 goes out.
    const second = compressDeltas(
      [delta([0, 1.5, 0, 1])],
      TOPK_QUARTER,
      first.residual,
    );

    assert.deepEqual(second.tensors[0].indices, [3]);
    assert.deepEqual([...decodeDeltaValues(second.tensors[0])], [0, 0, 0, 3]);
    assert.deepEqual([...second.residual.get('w')!], [0, 0.5, 0.5, 0]);
  });

  test('float32 round flushes the residual', () => {
    const residual = new Map([['w', new Float32Array([0, 0.5, 0.5, 0])]]);

    const flushed = compressDeltas([delta([1, 1, 1, 1])], FLOAT32, residual);

    assert.equal(flushed.tensors[0].encoding, TensorEncoding.Float32);
    assert.deepEqual(
      [...decodeDeltaValues(flushed.tensors[0])],
      [1, 1.5, 1.5, 1],
    );
    assert.equal(flushed.residual.size, 0);
  });

  test('input deltas stay unchanged', () => {
    const input = delta([4, -1, 0.5, 2]);
    const residual = new Map([['w', new Float32Array([1, 1, 1, 1])]]);

    compressDeltas([input], TOPK_QUARTER, residual);

    assert.deepEqual([...input.values], [4, -1, 0.5, 2]);
    assert.deepEqual([...residual.get('w')!], [1, 1, 1, 1]);
  });
});

describe('ErrorFeedback store', () => {
  const shapes = new Map([['w', [4]]]);
  const task = (modelVersion: number, modelName = 'gtsrb-cnn') => ({
    modelName,
    modelVersion,
    round: modelVersion + 1,
  });
  const residual = (baseModelVersion: number) => ({
    modelName: 'gtsrb-cnn',
    baseModelVersion,
    tensors: new Map([['w', new Float32Array([0, -1, 0.5, 2])]]),
  });

  test('residual survives a restart', async () => {
    const file = path.join(workDir, 'restart', 'error-feedback.pb');
    await new ErrorFeedback(file, log).save(residual(3));

    const reopened = new ErrorFeedback(file, log);

    assert.equal(reopened.residual?.baseModelVersion, 3);
    const values = reopened.residualFor(task(4), shapes)?.get('w');
    assert.deepEqual([...values!], [0, -1, 0.5, 2]);
  });

  test('empty residual deletes the file', async () => {
    const file = path.join(workDir, 'empty', 'error-feedback.pb');
    const feedback = new ErrorFeedback(file, log);
    await feedback.save(residual(1));
    assert.ok(existsSync(file));

    await feedback.save({ ...residual(2), tensors: new Map() });

    assert.equal(existsSync(file), false);
    assert.equal(feedback.residual, undefined);
  });

  test('residual kept for same version', async () => {
    const feedback = new ErrorFeedback(undefined, log);
    await feedback.save(residual(5));

    assert.ok(feedback.residualFor(task(5), shapes)?.has('w'));
    assert.ok(
      feedback.residualFor(task(5 + MAX_RESIDUAL_AGE_VERSIONS), shapes),
    );
  });

  test('residual dropped when model changes', async () => {
    const feedback = new ErrorFeedback(undefined, log);
    await feedback.save(residual(5));

    assert.equal(feedback.residualFor(task(4), shapes), undefined, 'rollback');
    assert.equal(
      feedback.residualFor(task(6 + MAX_RESIDUAL_AGE_VERSIONS), shapes),
      undefined,
      'stale',
    );
    assert.equal(
      feedback.residualFor(task(6, 'other-model'), shapes),
      undefined,
      'model name',
    );
  });

  test('tensor of another size dropped', async () => {
    const feedback = new ErrorFeedback(undefined, log);
    await feedback.save(residual(1));

    const usable = feedback.residualFor(
      task(2),
      new Map([
        ['w', [5]],
        ['b', [4]],
      ]),
    );

    assert.equal(usable?.size, 0);
  });

  test('unreadable file ignored', () => {
    const file = path.join(workDir, 'corrupt.pb');
    writeFileSync(file, Uint8Array.from([0x07, 0xff, 0x01]));

    const feedback = new ErrorFeedback(file, log);

    assert.equal(feedback.residual, undefined);
  });
});

describe('compressTrainingOutput', () => {
  test('float32 task returns output unchanged', async () => {
    const trained = output([4, -1, 0.5, 2]);
    const feedback = new ErrorFeedback(undefined, log);

    const sent = await compressTrainingOutput(
      trained,
      roundTask(undefined),
      feedback,
      (update) => encodeModelUpdate(update),
    );

    assert.equal(sent, trained);
  });

  test('topk task stores residual first', async () => {
    const file = path.join(workDir, 'output', 'error-feedback.pb');
    const feedback = new ErrorFeedback(file, log);

    const sent = await compressTrainingOutput(
      output([4, -1, 0.5, 2]),
      roundTask(TOPK_QUARTER),
      feedback,
      (update) => encodeModelUpdate(update),
    );

    const decoded = decodeModelUpdate(sent.payload);
    assert.equal(decoded.deltas[0].encoding, TensorEncoding.TopkSparse);
    assert.deepEqual(decoded.deltas[0].indices, [0]);
    assert.ok(existsSync(file));
    const stored = new ErrorFeedback(file, log).residual;
    assert.equal(stored?.baseModelVersion, 2);
    assert.deepEqual([...stored!.tensors.get('w')!], [0, -1, 0.5, 2]);
  });
});

/** Log lines as parsed objects, from a pino logger writing into memory. */
function captureLog() {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString().split('\n')) {
        if (line.trim() !== '') lines.push(JSON.parse(line));
      }
      done();
    },
  });
  return { log: pino({ level: 'warn' }, stream), lines };
}

/** Writes an error-feedback file whose tensor `w` contains `values`. */
function writeResidualFile(name: string, values: number[]): string {
  const file = path.join(workDir, name, 'error-feedback.pb');
  mkdirSync(path.dirname(file), { recursive: true });
  const bytes = encodeModelWeights({
    modelName: 'gtsrb-cnn',
    version: 2,
    tensors: [encodeFloat32Tensor('w', [4], new Float32Array(values))],
  });
  writeFileSync(file, bytes);
  return file;
}

function sendTopK(values: number[], feedback: ErrorFeedback) {
  return compressTrainingOutput(
    output(values),
    roundTask(TOPK_QUARTER),
    feedback,
    (update) => encodeModelUpdate(update),
  );
}

describe('error feedback robustness', () => {
  test('NaN residual file dropped at load', async () => {
    const file = writeResidualFile('nan', [0, Number.NaN, 1, 2]);
    const { log: captured, lines } = captureLog();

    const feedback = new ErrorFeedback(file, captured);

    assert.equal(feedback.residual, undefined);
    const warning = lines.find((line) => line.file === file);
    assert.equal(warning?.level, 40);
    assert.equal(warning?.tensor, 'w');
    assert.equal(warning?.index, 1);
    assert.equal(warning?.value, 'NaN');
    assert.equal(existsSync(file), false);
    const sent = decodeModelUpdate(
      (await sendTopK([4, -1, 0.5, 2], feedback)).payload,
    );
    assert.deepEqual([...decodeDeltaValues(sent.deltas[0])], [4, 0, 0, 0]);
  });

  test('huge residual file dropped at load', async () => {
    const file = writeResidualFile('huge', [0, 1, 3e38, -3e38]);
    const { log: captured, lines } = captureLog();

    const feedback = new ErrorFeedback(file, captured);

    assert.equal(feedback.residual, undefined);
    assert.equal(lines[0]?.index, 2);
    assert.equal(Number(lines[0]?.value), Math.fround(3e38));
    const sent = decodeModelUpdate(
      (await sendTopK([4, -1, 0.5, 2], feedback)).payload,
    );
    assert.deepEqual([...decodeDeltaValues(sent.deltas[0])], [4, 0, 0, 0]);
  });

  test('residual at the cap kept', () => {
    const cap = MAX_RESIDUAL_ABS_VALUE;
    const atCap = writeResidualFile('at-cap', [cap, -cap, 0, 1]);
    const above = writeResidualFile('above-cap', [cap, -cap * 1.01, 0, 1]);

    assert.equal(MAX_RESIDUAL_ABS_VALUE, 1000);
    assert.ok(new ErrorFeedback(atCap, log).residual);
    assert.equal(new ErrorFeedback(above, log).residual, undefined);
  });

  test('new residual above the cap dropped', async () => {
    const file = path.join(workDir, 'save-huge', 'error-feedback.pb');
    const { log: captured, lines } = captureLog();
    const feedback = new ErrorFeedback(file, captured);

    await feedback.save({
      modelName: 'gtsrb-cnn',
      baseModelVersion: 2,
      tensors: new Map([['w', new Float32Array([0, 2000, 0, 0])]]),
    });

    assert.equal(feedback.residual, undefined);
    assert.equal(existsSync(file), false);
    assert.equal(lines[0]?.value, '2000');
  });

  test('directory at file path still sends', async () => {
    const file = path.join(workDir, 'is-a-directory');
    mkdirSync(file);
    const { log: captured, lines } = captureLog();
    const feedback = new ErrorFeedback(file, captured);

    const sent = await sendTopK([4, -1, 0.5, 2], feedback);

    assert.deepEqual(decodeModelUpdate(sent.payload).deltas[0].indices, [0]);
    assert.deepEqual(
      [...feedback.residual!.tensors.get('w')!],
      [0, -1, 0.5, 2],
    );
    const notWritten = lines.find((line) =>
      String(line.msg).includes('not written'),
    );
    assert.equal(notWritten?.level, 40);
    assert.equal(notWritten?.file, file);
    assert.equal((notWritten?.err as { code?: string })?.code, 'EISDIR');
  });

  test('encode failure drops the residual', async () => {
    const file = path.join(workDir, 'encode-failure', 'error-feedback.pb');
    const { log: captured, lines } = captureLog();
    const feedback = new ErrorFeedback(file, captured);
    await sendTopK([4, -1, 0.5, 2], feedback);
    assert.ok(existsSync(file));

    await assert.rejects(
      sendTopK([4, Number.NaN, 0.5, 2], feedback),
      (err: unknown) => isFleetError(err, ErrorCode.NonFiniteValue),
    );

    assert.equal(feedback.residual, undefined);
    assert.equal(existsSync(file), false);
    assert.match(String(lines.at(-1)?.msg), /update encoding failed/);
    const next = decodeModelUpdate(
      (await sendTopK([1, 0, 0, 3], feedback)).payload,
    );
    assert.deepEqual([...decodeDeltaValues(next.deltas[0])], [0, 0, 0, 3]);
  });

  test('payload failure drops the residual', async () => {
    const feedback = new ErrorFeedback(undefined, log);
    await sendTopK([4, -1, 0.5, 2], feedback);

    await assert.rejects(
      compressTrainingOutput(
        output([1, 1, 1, 1]),
        roundTask(TOPK_QUARTER),
        feedback,
        // 16 bytes is below any update's size, as a too small broker limit.
        (update) => encodeUpdatePayload(update, 16),
      ),
      (err: unknown) => isFleetError(err, ErrorCode.PayloadTooLarge),
    );

    assert.equal(feedback.residual, undefined);
  });
});
