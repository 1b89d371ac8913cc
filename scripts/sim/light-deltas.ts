/**
 * Real training work shared by many light vehicles. A few updates are
 * trained once with the project's own training code, and each light
 * vehicle sends a perturbed copy of one of them. So 1,000 vehicles cost
 * one training run over a few hundred images instead of 1,000 runs.
 */
import { createHash, randomUUID } from 'node:crypto';
import {
  MODEL_NAME,
  TENSOR_SPECS,
  createRandom,
  loadLabelledImages,
  readWeightsFileContents,
  subset,
  tensorNamesOfLayers,
  trainLocal,
  type LabelledImages,
  type WeightMap,
} from '../../models/index.ts';
import {
  ErrorCode,
  FleetError,
  encodeFloat32Tensor,
  encodeModelUpdate,
  type Logger,
  type ModelUpdate,
  type RoundTask,
} from '../../protocol/index.ts';
import {
  compressionNameOf,
  compressionOfTask,
} from '../../protocol/compression/index.ts';

const SHAPES = new Map(TENSOR_SPECS.map((spec) => [spec.name, spec.shape]));

/**
 * Largest relative change a perturbation makes to one value: each value
 * is multiplied by a factor drawn uniformly from [1 - this, 1 + this].
 */
export const PERTURBATION_RELATIVE = 0.1;

/** One really trained update that light vehicles send copies of. */
export interface DeltaTemplate {
  /** Trained minus base values of the trainable tensors. */
  deltas: WeightMap;
  /** Examples the template was trained on. */
  numExamples: number;
  loss: number;
  accuracy: number;
  durationMs: number;
  /** Class ids present in the template's training images. */
  classes: number[];
}

/** Inputs of {@link trainDeltaTemplates}. */
export interface DeltaTemplateOptions {
  /** ModelWeights file of the model the templates train from. */
  baseWeightsPath: string;
  /** Data directory in GTSRB layout. */
  dataDir: string;
  /** Layers to train, as the aggregator's --trainable-layers. */
  trainableLayers: string[];
  /** Templates to train, at least 1. */
  templateCount: number;
  /** Training images read in all, shared out among the templates. */
  imageCount: number;
  seed: number;
  log: Logger;
}

/**
 * Trains `templateCount` updates from the base weights, one epoch each
 * with the aggregator's default hyperparameters (batch 32, Adam at 0.001,
 * softmax restricted to the local classes). Template k trains on the
 * images whose class id is k modulo `templateCount`, so that the
 * templates differ as non-IID vehicles do.
 *
 * @throws {RangeError} for a count below 1, or fewer images than
 *   templates.
 * @throws {FleetError} DATA_NOT_FOUND or INVALID_IMAGE from loading the
 *   images, INVALID_MODEL for an unreadable base weights file.
 */
export async function trainDeltaTemplates(
  options: DeltaTemplateOptions,
): Promise<DeltaTemplate[]> {
  const { templateCount, imageCount, log } = options;
  if (!Number.isInteger(templateCount) || templateCount < 1) {
    throw new RangeError(
      `template count ${templateCount} is invalid, expected an integer >= 1`,
    );
  }
  if (!Number.isInteger(imageCount) || imageCount < templateCount) {
    throw new RangeError(
      `image count ${imageCount} is invalid, expected an integer >= the ` +
        `template count ${templateCount}`,
    );
  }
  const base = readWeightsFileContents(options.baseWeightsPath);
  if (base.modelName !== MODEL_NAME) {
    throw new FleetError(
      ErrorCode.InvalidModel,
      `base weights ${options.baseWeightsPath} hold model ` +
        `${base.modelName}, expected ${MODEL_NAME}`,
    );
  }
  const frames = await loadLabelledImages(options.dataDir, {
    split: 'train',
    limit: imageCount,
  });
  const trainableTensors = tensorNamesOfLayers(options.trainableLayers);

  const templates: DeltaTemplate[] = [];
  for (let k = 0; k < templateCount; k++) {
    const share = shareOf(frames, k, templateCount);
    const result = await trainLocal(base.weights, share.images, share.labels, {
      trainableTensors,
      epochs: 1,
      batchSize: 32,
      learningRate: 0.001,
      proximalMu: 0,
      restrictToLocalClasses: true,
      seed: options.seed + k,
    });
    const classes = [...new Set(share.labels)].sort((a, b) => a - b);
    templates.push({ ...result, classes });
    log.info(
      {
        template: k,
        numExamples: result.numExamples,
        loss: result.loss,
        durationMs: Math.round(result.durationMs),
      },
      'delta template trained',
    );
  }
  return templates;
}

/** Images whose class id is `k` modulo `count`. */
function shareOf(
  frames: LabelledImages,
  k: number,
  count: number,
): LabelledImages {
  const indices: number[] = [];
  for (let i = 0; i < frames.count; i++) {
    if (frames.labels[i] % count === k) indices.push(i);
  }
  if (indices.length === 0) {
    throw new FleetError(
      ErrorCode.DataNotFound,
      `no training image has a class id equal to ${k} modulo ${count}; ` +
        'read more images or train fewer templates',
    );
  }
  return subset(frames, indices);
}

/**
 * Derives a 32-bit seed from the run's seed, a vehicle id and a round,
 * so that every vehicle perturbs differently in every round and a run
 * with the same seed sends the same values.
 */
export function perturbationSeed(
  seed: number,
  vehicleId: string,
  round: number,
): number {
  const digest = createHash('sha256')
    .update(`${seed}\0${vehicleId}\0${round}`)
    .digest();
  return digest.readUInt32LE(0);
}

/**
 * Returns `values` with each value multiplied by its own factor in
 * [1 - PERTURBATION_RELATIVE, 1 + PERTURBATION_RELATIVE], drawn from
 * `random`.
 */
export function perturbValues(
  values: Float32Array,
  random: () => number,
): Float32Array {
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const factor = 1 + PERTURBATION_RELATIVE * (2 * random() - 1);
    out[i] = values[i] * factor;
  }
  return out;
}

/** Inputs of {@link buildLightUpdate}. */
export interface LightUpdateInput {
  task: RoundTask;
  vehicleId: string;
  updateId: string;
  template: DeltaTemplate;
  /** FedAvg weight the vehicle claims. */
  numExamples: number;
  seed: number;
}

/**
 * Builds the ModelUpdate a light vehicle sends for `task`: the template's
 * deltas of the task's trainable tensors, perturbed with a seed derived
 * from `seed`, the vehicle id and the round.
 *
 * @throws {FleetError} WRONG_TENSORS when the task names a tensor the
 *   template was not trained on.
 */
export function buildLightUpdate(input: LightUpdateInput): ModelUpdate {
  const { task, template } = input;
  const random = createRandom(
    perturbationSeed(input.seed, input.vehicleId, task.round),
  );
  const deltas = task.training.trainableTensors.map((name) => {
    const values = template.deltas.get(name);
    const shape = SHAPES.get(name);
    if (values === undefined || shape === undefined) {
      throw new FleetError(
        ErrorCode.WrongTensors,
        `round ${task.round} trains tensor ${name}, but the light ` +
          `vehicles' templates hold only ${[...template.deltas.keys()].join(', ')}`,
      );
    }
    return encodeFloat32Tensor(name, shape, perturbValues(values, random));
  });
  return {
    updateId: input.updateId,
    vehicleId: input.vehicleId,
    modelName: task.modelName,
    baseModelVersion: task.modelVersion,
    round: task.round,
    numExamples: input.numExamples,
    deltas,
    metrics: {
      trainLoss: template.loss,
      trainAccuracy: template.accuracy,
      trainDurationMs: 0,
      backend: 'light-template',
    },
    createdAtMs: Date.now(),
  };
}

/**
 * Returns the reason a light vehicle cannot send an update for `task`
 * at `nowMs`, or undefined when it can. Light vehicles send float32
 * deltas only, and take no part in secure aggregation.
 */
export function unsupportedTaskReason(
  task: RoundTask,
  nowMs: number,
): string | undefined {
  if (task.secureAggregation) return 'secure aggregation round';
  let encoding: string;
  try {
    encoding = compressionNameOf(compressionOfTask(task).kind);
  } catch (err) {
    return `invalid update compression: ${(err as Error).message}`;
  }
  if (encoding !== 'float32') return `update compression ${encoding}`;
  if (task.deadlineMs > 0 && nowMs >= task.deadlineMs) return 'deadline passed';
  return undefined;
}

/** Inputs of {@link encodeLightUpdate}. */
export interface LightPayloadInput {
  task: RoundTask;
  vehicleId: string;
  templates: readonly DeltaTemplate[];
  seed: number;
  /** Picks the template and the example count. */
  random: () => number;
  maxMessageBytes: number;
}

/**
 * Encodes the update of one vehicle for `task`, under a new update id: a
 * template picked by `random`, perturbed, claiming between half and one
 * and a half times the template's examples.
 *
 * @throws {FleetError} WRONG_TENSORS as buildLightUpdate, and
 *   PAYLOAD_TOO_LARGE above `maxMessageBytes`.
 */
export function encodeLightUpdate(input: LightPayloadInput): {
  updateId: string;
  bytes: Uint8Array;
} {
  const { templates, random } = input;
  const template = templates[Math.floor(random() * templates.length)];
  const numExamples = Math.max(
    1,
    Math.round(template.numExamples * (0.5 + random())),
  );
  const updateId = randomUUID();
  const update = buildLightUpdate({
    task: input.task,
    vehicleId: input.vehicleId,
    updateId,
    template,
    numExamples,
    seed: input.seed,
  });
  return { updateId, bytes: encodeModelUpdate(update, input.maxMessageBytes) };
}
