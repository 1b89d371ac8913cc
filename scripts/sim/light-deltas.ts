/**
 * Real training work shared by many light vehicles: a few updates trained
 * once with the project's own training code, which each light vehicle
 * then sends perturbed, so that 1,000 vehicles cost one training run of
 * a few hundred images instead of 1,000.
 */
import { createHash } from 'node:crypto';
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
  type Logger,
  type ModelUpdate,
  type RoundTask,
} from '../../protocol/index.ts';

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

/** What a light vehicle needs to build its update for one task. */
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
