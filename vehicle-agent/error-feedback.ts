/**
 * Update compression on the vehicle, with error feedback for top-k: what a
 * top-k update leaves out (the residual) is added to the next round's
 * delta, so every coordinate reaches the model eventually instead of
 * never. The residual is kept in a file so that a restart does not lose
 * it.
 */
import { readFileSync, rmSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import {
  decodeModelWeights,
  decodeTensorValues,
  encodeFloat32Tensor,
  encodeModelWeights,
  type Logger,
  type ModelUpdate,
  type RoundTask,
} from '../protocol/index.ts';
import {
  CompressionKind,
  compressionOfTask,
  decodeDeltaValues,
  encodeDeltaTensor,
  type UpdateCompression,
} from '../protocol/compression/index.ts';
import { writeFileAtomic } from './model-files.ts';
import type { RoundTrainingOutput } from './trainer.ts';

/**
 * Model versions a residual may lag behind the round's model before it is
 * dropped. Its coordinates were computed against that older model, and a
 * vehicle that was not selected for many rounds would otherwise push
 * stale progress into a model that has moved on. 20 is a judgment call,
 * not a measured optimum.
 */
export const MAX_RESIDUAL_AGE_VERSIONS = 20;

/**
 * Largest magnitude a kept residual value may have: the aggregator's
 * default maxAbsDeltaValue (1000). The aggregator rejects a larger value
 * as VALUE_OUT_OF_RANGE, so a residual above it would get every later
 * update of the vehicle rejected.
 */
export const MAX_RESIDUAL_ABS_VALUE = 1000;

/** Unsent part of the last top-k update, by tensor name. */
export interface Residual {
  modelName: string;
  /** Model version the delta that left this residual was trained from. */
  baseModelVersion: number;
  tensors: Map<string, Float32Array>;
}

/** One delta tensor before encoding. */
export interface DeltaTensor {
  name: string;
  shape: readonly number[];
  values: Float32Array;
}

/** Outcome of {@link compressDeltas}. */
export interface CompressedDeltas {
  tensors: ModelUpdate['deltas'];
  /** Unsent remainder of a top-k update; empty for the other kinds. */
  residual: Map<string, Float32Array>;
}

/**
 * Encodes `deltas` in the encoding of `compression`, after adding
 * `residual` to them.
 * Top-k returns the new residual, delta + residual - sent. The other kinds
 * send delta + residual as a whole, which flushes an old top-k residual
 * into the model, and return an empty residual.
 *
 * @throws {FleetError} from encodeDeltaTensor.
 */
export function compressDeltas(
  deltas: readonly DeltaTensor[],
  compression: UpdateCompression,
  residual: ReadonlyMap<string, Float32Array> | undefined,
): CompressedDeltas {
  const tensors: ModelUpdate['deltas'] = [];
  const nextResidual = new Map<string, Float32Array>();
  for (const { name, shape, values } of deltas) {
    const corrected = addResidual(values, residual?.get(name));
    const tensor = encodeDeltaTensor(name, shape, corrected, compression);
    tensors.push(tensor);
    if (compression.kind !== CompressionKind.TopK) continue;
    const sent = decodeDeltaValues(tensor);
    const left = new Float32Array(corrected.length);
    for (let i = 0; i < left.length; i++) left[i] = corrected[i] - sent[i];
    nextResidual.set(name, left);
  }
  return { tensors, residual: nextResidual };
}

function addResidual(
  values: Float32Array,
  residual: Float32Array | undefined,
): Float32Array {
  if (residual === undefined) return values;
  const sum = new Float32Array(values.length);
  for (let i = 0; i < sum.length; i++) sum[i] = values[i] + residual[i];
  return sum;
}

/**
 * The residual of the last top-k update, in memory and, when a file is
 * given, on disk.
 */
export class ErrorFeedback {
  readonly #file: string | undefined;
  readonly #log: Logger;
  #residual: Residual | undefined;

  /**
   * Reads `file` if it exists. A file that cannot be read or decoded is
   * logged and ignored, which costs only the unsent part of one update.
   * A file with a value that is not finite or above
   * MAX_RESIDUAL_ABS_VALUE is logged at warn with the first such value,
   * and deleted.
   * Without `file` the residual lives in memory only.
   */
  constructor(file: string | undefined, log: Logger) {
    this.#file = file;
    this.#log = log;
    this.#residual = file === undefined ? undefined : readResidual(file, log);
  }

  /** The residual kept now, if any. */
  get residual(): Residual | undefined {
    return this.#residual;
  }

  /**
   * Returns the residual to add to the delta of `task`, by tensor name,
   * or undefined. The residual is dropped for another model name, for a
   * model version below its own (a rollback withdrew the versions it was
   * trained from), and for one more than MAX_RESIDUAL_AGE_VERSIONS above
   * it. Tensors of `shapes` whose name or size differs are dropped one by
   * one, so a change of the trainable layers keeps what still fits.
   */
  residualFor(
    task: Pick<RoundTask, 'modelName' | 'modelVersion' | 'round'>,
    shapes: ReadonlyMap<string, readonly number[]>,
  ): Map<string, Float32Array> | undefined {
    const residual = this.#residual;
    if (residual === undefined) return undefined;
    const age = task.modelVersion - residual.baseModelVersion;
    const isUsable =
      residual.modelName === task.modelName &&
      age >= 0 &&
      age <= MAX_RESIDUAL_AGE_VERSIONS;
    if (!isUsable) {
      this.#log.info(
        {
          round: task.round,
          modelVersion: task.modelVersion,
          residualModelVersion: residual.baseModelVersion,
        },
        'error feedback residual dropped: model changed',
      );
      return undefined;
    }
    const usable = new Map<string, Float32Array>();
    for (const [name, shape] of shapes) {
      const values = residual.tensors.get(name);
      const size = shape.reduce((product, dim) => product * dim, 1);
      if (values !== undefined && values.length === size) {
        usable.set(name, values);
      }
    }
    return usable;
  }

  /**
   * Keeps `residual` (or nothing when it is undefined or empty) and
   * writes it through a temporary file and a rename, or deletes the file.
   * A residual with a value that is not finite or above
   * MAX_RESIDUAL_ABS_VALUE is dropped and logged instead. A file that
   * cannot be written or deleted is logged at warn, not thrown, and the
   * residual is then kept in memory only, so the update that left it can
   * still be sent.
   */
  async save(residual: Residual | undefined): Promise<void> {
    let next = residual;
    const bad = next === undefined ? undefined : findBadValue(next.tensors);
    if (bad !== undefined) {
      this.#log.warn(
        { ...describeBadValue(bad), file: this.#file },
        'error feedback residual dropped: value not finite or too large',
      );
      next = undefined;
    }
    if (next === undefined || next.tensors.size === 0) {
      this.#residual = undefined;
      await this.#removeFile();
      return;
    }
    this.#residual = next;
    if (this.#file === undefined) return;
    const bytes = encodeModelWeights({
      modelName: next.modelName,
      version: next.baseModelVersion,
      tensors: [...next.tensors].map(([name, values]) =>
        encodeFloat32Tensor(name, [values.length], values),
      ),
    });
    try {
      await writeFileAtomic(this.#file, bytes);
    } catch (err) {
      this.#log.warn(
        { err, file: this.#file },
        'error feedback file not written, residual kept in memory only',
      );
      // An older residual left in the file would come back at restart.
      await this.#removeFile();
    }
  }

  /**
   * Drops the residual after the update it was added to failed to
   * encode, so that a residual that caused the failure does not fail the
   * next rounds too.
   */
  async dropAfterFailure(err: unknown, round: number): Promise<void> {
    if (this.#residual === undefined) return;
    this.#log.warn(
      { err, round, file: this.#file },
      'error feedback residual dropped: update encoding failed',
    );
    await this.save(undefined);
  }

  async #removeFile(): Promise<void> {
    if (this.#file === undefined) return;
    try {
      await rm(this.#file, { force: true });
    } catch (err) {
      this.#log.warn(
        { err, file: this.#file },
        'error feedback file not removed',
      );
    }
  }
}

/** First value of a residual that may not be kept. */
interface BadValue {
  tensor: string;
  index: number;
  value: number;
}

function findBadValue(
  tensors: ReadonlyMap<string, Float32Array>,
): BadValue | undefined {
  for (const [tensor, values] of tensors) {
    for (let index = 0; index < values.length; index++) {
      const value = values[index];
      // Written so that NaN fails the check too.
      if (!(Math.abs(value) <= MAX_RESIDUAL_ABS_VALUE)) {
        return { tensor, index, value };
      }
    }
  }
  return undefined;
}

/** Log fields of a bad value; String() keeps NaN, which JSON turns to null. */
function describeBadValue(bad: BadValue) {
  return {
    tensor: bad.tensor,
    index: bad.index,
    value: String(bad.value),
    maxAbsValue: MAX_RESIDUAL_ABS_VALUE,
  };
}

function readResidual(file: string, log: Logger): Residual | undefined {
  let bytes: Uint8Array;
  try {
    bytes = readFileSync(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    log.warn({ err, file }, 'error feedback file not readable, ignored');
    return undefined;
  }
  let residual: Residual;
  try {
    const weights = decodeModelWeights(bytes);
    const tensors = new Map(
      weights.tensors.map((tensor) => [
        tensor.name,
        decodeTensorValues(tensor).slice(),
      ]),
    );
    residual = {
      modelName: weights.modelName,
      baseModelVersion: weights.version,
      tensors,
    };
  } catch (err) {
    log.warn({ err, file }, 'error feedback file not decodable, ignored');
    return undefined;
  }
  const bad = findBadValue(residual.tensors);
  if (bad === undefined) return residual;
  log.warn(
    { ...describeBadValue(bad), file },
    'error feedback file dropped: value not finite or too large',
  );
  try {
    rmSync(file, { force: true });
  } catch (err) {
    log.warn({ err, file }, 'error feedback file not removed');
  }
  return undefined;
}

/**
 * Re-encodes a trained update in the task's compression, with error
 * feedback, and stores the new residual before returning. A float32 round
 * without a residual returns `output` unchanged. When compression or
 * `encodePayload` fails, the residual is dropped before the error is
 * rethrown, so the next round starts without it.
 *
 * @param encodePayload encodes (and signs) the changed update.
 * @throws {FleetError} INVALID_CONFIG for a compression the task cannot
 *   use, and the errors of compressDeltas and `encodePayload`.
 */
export async function compressTrainingOutput(
  output: RoundTrainingOutput,
  task: RoundTask,
  feedback: ErrorFeedback,
  encodePayload: (update: ModelUpdate) => Uint8Array,
): Promise<RoundTrainingOutput> {
  const compression = compressionOfTask(task);
  const deltas = output.update.deltas.map((tensor) => ({
    name: tensor.name,
    shape: tensor.shape,
    values: decodeTensorValues(tensor),
  }));
  const shapes = new Map(deltas.map((delta) => [delta.name, delta.shape]));
  const residual = feedback.residualFor(task, shapes);
  const isPlain = compression.kind === CompressionKind.Float32;
  if (isPlain && residual === undefined) {
    // Drops a residual that residualFor found unusable.
    if (feedback.residual !== undefined) await feedback.save(undefined);
    return output;
  }

  let tensors: ModelUpdate['deltas'];
  let left: Map<string, Float32Array>;
  let update: ModelUpdate;
  let payload: Uint8Array;
  try {
    ({ tensors, residual: left } = compressDeltas(
      deltas,
      compression,
      residual,
    ));
    update = { ...output.update, deltas: tensors };
    payload = encodePayload(update);
  } catch (err) {
    await feedback.dropAfterFailure(err, task.round);
    throw err;
  }
  await feedback.save({
    modelName: task.modelName,
    baseModelVersion: task.modelVersion,
    tensors: left,
  });
  return { ...output, update, payload };
}
