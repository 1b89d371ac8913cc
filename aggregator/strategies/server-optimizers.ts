/**
 * Server optimizers applied to the round's mean delta, which acts as a
 * pseudo-gradient pointing downhill (Δ = trained - base, averaged):
 *
 * - FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data
 *   Distribution for Federated Visual Classification", 2019): server
 *   momentum m = β m + Δ, then x = x + η m.
 * - FedAdagrad, FedAdam, FedYogi (Reddi et al., "Adaptive Federated
 *   Optimization", ICLR 2021, Algorithm 2): m = β1 m + (1 - β1) Δ, then
 *     Adagrad: v = v + Δ²
 *     Adam:    v = β2 v + (1 - β2) Δ²
 *     Yogi:    v = v - (1 - β2) Δ² sign(v - Δ²)
 *   and x = x + η m / (√v + τ), per coordinate. As in Algorithm 2 there
 *   is no bias correction, and v starts at τ² (the algorithm requires
 *   v ≥ τ² before the first step).
 *
 * With momentum 0 and η = 1, FedAvgM is plain FedAvg. All arithmetic runs
 * in float64; new weights are rounded once to float32.
 */
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import type { WeightMap } from '../../models/architecture.ts';
import {
  type ServerOptimizerState,
  type TensorMoments,
  SERVER_OPTIMIZER_STATE_FORMAT,
  createServerOptimizerState,
} from './server-optimizer-state.ts';
import { compareIds, findNonFinite, nonFiniteError } from './vehicle-update.ts';

/** FedAvgM settings. */
export interface FedAvgMConfig {
  optimizer: 'fedavgm';
  /** η > 0. With 1 the momentum buffer is applied unscaled. */
  serverLearningRate: number;
  /** β in [0, 1), where 0 turns momentum off. */
  momentum: number;
}

/** FedAdagrad settings. Adagrad's v does not decay, so there is no β2. */
export interface FedAdagradConfig {
  optimizer: 'fedadagrad';
  /** η > 0. */
  serverLearningRate: number;
  /** β1 in [0, 1), decay of the first moment. */
  beta1: number;
  /** τ > 0, the degree of adaptivity: larger τ adapts less. */
  tau: number;
  /** v before the first step, >= 0, by default τ². */
  initialSecondMoment?: number;
}

/** FedAdam or FedYogi settings. */
export interface FedAdamConfig {
  optimizer: 'fedadam' | 'fedyogi';
  /** η > 0. */
  serverLearningRate: number;
  /** β1 in [0, 1), decay of the first moment. */
  beta1: number;
  /** β2 in [0, 1), decay of the second moment. */
  beta2: number;
  /** τ > 0, the degree of adaptivity: larger τ adapts less. */
  tau: number;
  /** v before the first step, >= 0, by default τ². */
  initialSecondMoment?: number;
}

export type ServerOptimizerConfig =
  FedAvgMConfig | FedAdagradConfig | FedAdamConfig;

/** Result of applyServerOptimizer. */
export interface ServerStepResult {
  /** `weights` with the delta's tensors replaced and the others shared. */
  weights: WeightMap;
  state: ServerOptimizerState;
}

/**
 * Applies one server optimizer step to the tensors named in `meanDelta`.
 * Pass `state` undefined for the first round, then the returned state.
 * The inputs are not modified.
 *
 * @throws {FleetError} NON_FINITE_VALUE for a NaN or infinite delta, or
 *   when the step produces a weight outside the float32 range;
 *   INVALID_CONFIG when `state` belongs to another optimizer or to other
 *   tensors (reset it when the trainable tensors change).
 * @throws {RangeError} for a bad config, an empty delta, or a delta whose
 *   tensor `weights` lacks or has at another size.
 */
export function applyServerOptimizer(
  weights: ReadonlyMap<string, Float32Array>,
  meanDelta: ReadonlyMap<string, Float32Array>,
  state: ServerOptimizerState | undefined,
  config: ServerOptimizerConfig,
): ServerStepResult {
  checkConfig(config);
  const tensorSizes = checkDelta(weights, meanDelta);
  const initialSecondMoment =
    config.optimizer === 'fedavgm'
      ? 0
      : (config.initialSecondMoment ?? config.tau * config.tau);
  const previous =
    state ??
    createServerOptimizerState(
      config.optimizer,
      tensorSizes,
      initialSecondMoment,
    );
  checkStateMatches(previous, config, tensorSizes);

  const next: WeightMap = new Map(weights);
  const tensors = previous.tensors.map((moments) => {
    const updated = stepTensor(
      weights.get(moments.name)!,
      meanDelta.get(moments.name)!,
      moments,
      config,
    );
    next.set(moments.name, updated.weights);
    return updated.moments;
  });
  return {
    weights: next,
    state: {
      format: SERVER_OPTIMIZER_STATE_FORMAT,
      optimizer: config.optimizer,
      step: previous.step + 1,
      tensors,
    },
  };
}

/** Steps one tensor into new arrays, leaving the inputs unchanged. */
function stepTensor(
  weights: Float32Array,
  delta: Float32Array,
  moments: TensorMoments,
  config: ServerOptimizerConfig,
): { weights: Float32Array; moments: TensorMoments } {
  const size = delta.length;
  const updated = new Float32Array(size);
  const firstMoment = new Array<number>(size);
  const secondMoment = new Array<number>(
    config.optimizer === 'fedavgm' ? 0 : size,
  );

  for (let i = 0; i < size; i++) {
    const d = delta[i];
    if (config.optimizer === 'fedavgm') {
      const m = config.momentum * moments.firstMoment[i] + d;
      firstMoment[i] = m;
      updated[i] = weights[i] + config.serverLearningRate * m;
    } else {
      const m = config.beta1 * moments.firstMoment[i] + (1 - config.beta1) * d;
      const v = updateSecondMoment(moments.secondMoment[i], d, config);
      firstMoment[i] = m;
      secondMoment[i] = v;
      updated[i] =
        weights[i] +
        (config.serverLearningRate * m) / (Math.sqrt(v) + config.tau);
    }
    if (!Number.isFinite(updated[i])) {
      throw new FleetError(
        ErrorCode.NonFiniteValue,
        `${config.optimizer} step produced ${updated[i]} for tensor ` +
          `${moments.name} at index ${i} from weight ${weights[i]} and ` +
          `delta ${d}; expected a finite float32`,
      );
    }
  }
  return {
    weights: updated,
    moments: { name: moments.name, firstMoment, secondMoment },
  };
}

function updateSecondMoment(
  v: number,
  d: number,
  config: FedAdagradConfig | FedAdamConfig,
): number {
  const squared = d * d;
  switch (config.optimizer) {
    case 'fedadagrad':
      return v + squared;
    case 'fedadam':
      return config.beta2 * v + (1 - config.beta2) * squared;
    case 'fedyogi':
      return v - (1 - config.beta2) * squared * Math.sign(v - squared);
  }
}

function checkConfig(config: ServerOptimizerConfig): void {
  checkPositive('serverLearningRate', config.serverLearningRate);
  if (config.optimizer === 'fedavgm') {
    checkDecay('momentum', config.momentum);
    return;
  }
  if (config.optimizer === 'fedadam' || config.optimizer === 'fedyogi') {
    checkDecay('beta2', config.beta2);
  } else if (config.optimizer !== 'fedadagrad') {
    throw new RangeError(
      'optimizer must be fedavgm, fedadagrad, fedadam or fedyogi, got ' +
        String((config as { optimizer: unknown }).optimizer),
    );
  }
  checkDecay('beta1', config.beta1);
  checkPositive('tau', config.tau);
  const { initialSecondMoment } = config;
  if (
    initialSecondMoment !== undefined &&
    !(Number.isFinite(initialSecondMoment) && initialSecondMoment >= 0)
  ) {
    throw new RangeError(
      `initialSecondMoment must be finite and >= 0, got ${initialSecondMoment}`,
    );
  }
}

function checkPositive(name: string, value: number): void {
  if (!(Number.isFinite(value) && value > 0)) {
    throw new RangeError(`${name} must be finite and > 0, got ${value}`);
  }
}

function checkDecay(name: string, value: number): void {
  if (!(value >= 0 && value < 1)) {
    throw new RangeError(`${name} must be in [0, 1), got ${value}`);
  }
}

/** Checks the delta against the weights and returns its tensor sizes. */
function checkDelta(
  weights: ReadonlyMap<string, Float32Array>,
  meanDelta: ReadonlyMap<string, Float32Array>,
): Map<string, number> {
  if (meanDelta.size === 0) {
    throw new RangeError('mean delta has no tensors; expected at least one');
  }
  const tensorSizes = new Map<string, number>();
  for (const name of [...meanDelta.keys()].sort(compareIds)) {
    const delta = meanDelta.get(name)!;
    const base = weights.get(name);
    if (base === undefined) {
      throw new RangeError(`mean delta for unknown tensor ${name}`);
    }
    if (base.length !== delta.length) {
      throw new RangeError(
        `mean delta for ${name} has ${delta.length} values, ` +
          `expected ${base.length}`,
      );
    }
    tensorSizes.set(name, delta.length);
  }
  const found = findNonFinite(meanDelta);
  if (found !== undefined) throw nonFiniteError(found);
  return tensorSizes;
}

function checkStateMatches(
  state: ServerOptimizerState,
  config: ServerOptimizerConfig,
  tensorSizes: ReadonlyMap<string, number>,
): void {
  if (state.optimizer !== config.optimizer) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `server optimizer state is for ${state.optimizer}, but the config ` +
        `asks for ${config.optimizer}; start from a new state`,
    );
  }
  const stateNames = state.tensors.map((t) => t.name).join(', ');
  const deltaNames = [...tensorSizes.keys()].join(', ');
  const secondMomentSize = (size: number | undefined): number | undefined =>
    config.optimizer === 'fedavgm' ? 0 : size;
  const sizesMatch = state.tensors.every(
    (t) =>
      t.firstMoment.length === tensorSizes.get(t.name) &&
      t.secondMoment.length === secondMomentSize(tensorSizes.get(t.name)),
  );
  if (stateNames !== deltaNames || !sizesMatch) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `server optimizer state holds tensors [${stateNames}] with other ` +
        `names or sizes than the mean delta [${deltaNames}]; start from a ` +
        'new state when the trainable tensors change',
    );
  }
}
