/**
 * Server optimizer of real rounds: the `serverOptimizer` aggregator
 * option, and the step that turns a round's mean delta into the change of
 * the current weights (FedAvgM, FedAdagrad, FedAdam or FedYogi, see
 * strategies/server-optimizers.ts). The optimizer's moments persist in
 * stateDir/server-optimizer.json.
 *
 * The file names the model version its moments led to, and commitRound
 * writes it only after that version is stored. A round that fails (export
 * mismatch, non-finite weights, a release that does not fit) leaves the
 * file and the moments in memory as they were.
 *
 * Rollback resets the moments: when the file names another version than
 * the one the round runner starts from, the optimizer starts again from
 * zero momentum (and v = τ² for the adaptive ones), as in a run's first
 * round. A rollback is the usual way to get there, at start or while
 * running, and the moments it discards were built from the deltas of the
 * withdrawn versions, so they point the way the fleet was rolled back
 * from. Moments of older versions are not kept, because one copy per
 * version would cost as much as the file: for the default trainable
 * tensors 2.1 MB for FedAvgM and 5.2 MB for FedAdam after 8 simulated
 * rounds.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, FleetError, type Logger } from '../protocol/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import {
  SERVER_OPTIMIZER_NAMES,
  applyServerOptimizer,
  parseServerOptimizerState,
  type ServerOptimizerConfig,
  type ServerOptimizerName,
  type ServerOptimizerState,
} from './strategies/index.ts';
import { compareIds } from './strategies/vehicle-update.ts';
import { writeFileAtomic } from './state.ts';

/** File of the server optimizer's moments in the state directory. */
export const SERVER_OPTIMIZER_FILE = 'server-optimizer.json';

/**
 * Defaults. β1 = 0.9, β2 = 0.99 and τ = 1e-3 are the values Reddi et al.
 * ("Adaptive Federated Optimization", ICLR 2021) fix in their
 * experiments. η = 1 with β = 0.9 is the usual FedAvgM start. For the
 * adaptive optimizers η = 0.01 is a starting point to tune: once the
 * moments settle, a step moves each weight by roughly η.
 */
export const SERVER_OPTIMIZER_DEFAULTS = {
  fedavgmLearningRate: 1,
  adaptiveLearningRate: 0.01,
  momentum: 0.9,
  beta1: 0.9,
  beta2: 0.99,
  tau: 1e-3,
} as const;

/** The `serverOptimizer` aggregator option. */
export interface ServerOptimizerOptions {
  optimizer: ServerOptimizerName;
  /** η > 0. Default 1 for fedavgm, 0.01 for the adaptive optimizers. */
  serverLearningRate?: number;
  /** FedAvgM only: β in [0, 1). Default 0.9. */
  momentum?: number;
  /** FedAdagrad, FedAdam, FedYogi: decay of m, in [0, 1). Default 0.9. */
  beta1?: number;
  /** FedAdam, FedYogi: decay of v, in [0, 1). Default 0.99. */
  beta2?: number;
  /** FedAdagrad, FedAdam, FedYogi: τ > 0, where larger adapts less. Default 1e-3. */
  tau?: number;
}

/** Settings each optimizer takes besides serverLearningRate. */
const SETTINGS_OF: Record<ServerOptimizerName, readonly string[]> = {
  fedavgm: ['momentum'],
  fedadagrad: ['beta1', 'tau'],
  fedadam: ['beta1', 'beta2', 'tau'],
  fedyogi: ['beta1', 'beta2', 'tau'],
};

function invalid(field: string, value: unknown, expected: string): never {
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `aggregator option serverOptimizer.${field} is ${String(value)}, ` +
      `expected ${expected}`,
  );
}

function requirePositive(field: string, value: number): void {
  if (typeof value !== 'number' || !(value > 0) || !Number.isFinite(value)) {
    invalid(field, value, 'a finite number > 0');
  }
}

function requireDecay(field: string, value: number): void {
  if (typeof value !== 'number' || !(value >= 0 && value < 1)) {
    invalid(field, value, 'a number in [0, 1)');
  }
}

/**
 * Checks the option and fills in the defaults.
 *
 * @throws {FleetError} INVALID_CONFIG naming the field, for an unknown
 *   optimizer, a value out of range, or a setting the optimizer does not
 *   take (for example momentum with fedadam).
 */
export function resolveServerOptimizer(
  options: ServerOptimizerOptions,
): ServerOptimizerConfig {
  const { optimizer } = options;
  if (!SERVER_OPTIMIZER_NAMES.includes(optimizer)) {
    invalid(
      'optimizer',
      optimizer,
      `one of ${SERVER_OPTIMIZER_NAMES.join(', ')}`,
    );
  }
  const allowed = SETTINGS_OF[optimizer];
  for (const field of ['momentum', 'beta1', 'beta2', 'tau'] as const) {
    if (options[field] !== undefined && !allowed.includes(field)) {
      invalid(
        field,
        options[field],
        `no value: ${optimizer} takes serverLearningRate and ` +
          allowed.join(', '),
      );
    }
  }

  const defaults = SERVER_OPTIMIZER_DEFAULTS;
  const serverLearningRate =
    options.serverLearningRate ??
    (optimizer === 'fedavgm'
      ? defaults.fedavgmLearningRate
      : defaults.adaptiveLearningRate);
  requirePositive('serverLearningRate', serverLearningRate);
  if (optimizer === 'fedavgm') {
    const momentum = options.momentum ?? defaults.momentum;
    requireDecay('momentum', momentum);
    return { optimizer, serverLearningRate, momentum };
  }

  const beta1 = options.beta1 ?? defaults.beta1;
  const tau = options.tau ?? defaults.tau;
  requireDecay('beta1', beta1);
  requirePositive('tau', tau);
  if (optimizer === 'fedadagrad') {
    return { optimizer, serverLearningRate, beta1, tau };
  }
  const beta2 = options.beta2 ?? defaults.beta2;
  requireDecay('beta2', beta2);
  return { optimizer, serverLearningRate, beta1, beta2, tau };
}

/** Flags of addServerOptimizerOptions, as commander parses them. */
export interface ServerOptimizerFlags {
  serverOptimizer?: string;
  serverLr?: number;
  serverMomentum?: number;
  serverBeta1?: number;
  serverBeta2?: number;
  serverTau?: number;
}

/**
 * Returns the serverOptimizer option of the `--server-*` flags, or
 * undefined without --server-optimizer. resolveServerOptimizer checks the
 * values.
 *
 * @throws {FleetError} INVALID_CONFIG for a --server-* setting without
 *   --server-optimizer.
 */
export function serverOptimizerOfFlags(
  flags: ServerOptimizerFlags,
): ServerOptimizerOptions | undefined {
  const settings = {
    serverLearningRate: flags.serverLr,
    momentum: flags.serverMomentum,
    beta1: flags.serverBeta1,
    beta2: flags.serverBeta2,
    tau: flags.serverTau,
  };
  if (flags.serverOptimizer === undefined) {
    if (Object.values(settings).some((value) => value !== undefined)) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        '--server-lr, --server-momentum, --server-beta1, --server-beta2 ' +
          'and --server-tau need --server-optimizer',
      );
    }
    return undefined;
  }
  const givenSettings = Object.entries(settings).filter(
    ([, v]) => v !== undefined,
  );
  return {
    optimizer: flags.serverOptimizer as ServerOptimizerName,
    ...Object.fromEntries(givenSettings),
  };
}

/** A step computed from a round's mean delta and not yet saved. */
export interface ProposedServerStep {
  /** The current weights with the trainable tensors stepped. */
  weights: WeightMap;
  /**
   * Writes the new moments to the state file as those that led to
   * `modelVersion`, and makes them the moments of the next step. Call it
   * once the version is stored.
   */
  commit(modelVersion: number): void;
}

/** Contents of server-optimizer.json. */
interface StateFile {
  /** Model version the moments led to. */
  modelVersion: number;
  /** Settings in force when it was written, for operators. */
  config: ServerOptimizerConfig;
  state: ServerOptimizerState;
}

/** The server optimizer of one round runner and its state file. */
export class ServerStep {
  readonly config: ServerOptimizerConfig;
  readonly path: string;
  /** Undefined before the first step, or after a reset. */
  #state: ServerOptimizerState | undefined;

  private constructor(
    config: ServerOptimizerConfig,
    path: string,
    state: ServerOptimizerState | undefined,
  ) {
    this.config = config;
    this.path = path;
    this.#state = state;
  }

  /**
   * Loads stateDir/server-optimizer.json when it exists and checks it
   * against the configuration. Moments saved for another model version
   * than `modelVersion` are dropped (see the file comment).
   *
   * @throws {FleetError} INVALID_CONFIG naming the file when it is not
   *   valid state, contains another optimizer's moments, or moments of
   *   other tensors than `tensorSizes`.
   */
  static open(options: {
    stateDir: string;
    config: ServerOptimizerConfig;
    /** Element count of each trainable tensor. */
    tensorSizes: ReadonlyMap<string, number>;
    /** Version the runner starts from. */
    modelVersion: number;
    log: Logger;
  }): ServerStep {
    const { config, modelVersion, log } = options;
    const path = join(options.stateDir, SERVER_OPTIMIZER_FILE);
    if (!existsSync(path)) {
      log.info(
        { optimizer: config.optimizer, path },
        'server optimizer started from zero moments',
      );
      return new ServerStep(config, path, undefined);
    }

    const file = readStateFile(path);
    checkStateFile(path, file, config, options.tensorSizes);
    if (file.modelVersion !== modelVersion) {
      log.warn(
        {
          optimizer: config.optimizer,
          path,
          modelVersion,
          stateModelVersion: file.modelVersion,
        },
        'server optimizer state reset',
      );
      return new ServerStep(config, path, undefined);
    }
    log.info(
      {
        optimizer: config.optimizer,
        path,
        modelVersion,
        step: file.state.step,
      },
      'server optimizer state loaded',
    );
    return new ServerStep(config, path, file.state);
  }

  /** Steps behind the moments in memory, 0 before the first step. */
  get step(): number {
    return this.#state?.step ?? 0;
  }

  /**
   * Computes the next weights from `weights` and the round's mean delta.
   * Nothing is saved, and the moments stay as they are, until `commit`.
   *
   * @throws the errors of applyServerOptimizer, for example
   *   NON_FINITE_VALUE when a stepped weight overflows float32.
   */
  propose(
    weights: ReadonlyMap<string, Float32Array>,
    meanDelta: ReadonlyMap<string, Float32Array>,
  ): ProposedServerStep {
    const result = applyServerOptimizer(
      weights,
      meanDelta,
      this.#state,
      this.config,
    );
    return {
      weights: result.weights,
      commit: (modelVersion) => this.#commit(result.state, modelVersion),
    };
  }

  #commit(state: ServerOptimizerState, modelVersion: number): void {
    const file: StateFile = { modelVersion, config: this.config, state };
    // No indentation: the moments are hundreds of thousands of numbers.
    writeFileAtomic(this.path, `${JSON.stringify(file)}\n`);
    this.#state = state;
  }
}

function invalidFile(path: string, detail: string, cause?: unknown): never {
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `server optimizer state ${path} ${detail}; delete it to start the ` +
      'optimizer from zero moments',
    cause === undefined ? undefined : { cause },
  );
}

function readStateFile(path: string): StateFile {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch (err) {
    invalidFile(path, `cannot be read: ${(err as Error).message}`, err);
  }
  const record = (parsed ?? {}) as Record<string, unknown>;
  const { modelVersion } = record;
  if (!Number.isSafeInteger(modelVersion) || (modelVersion as number) < 0) {
    invalidFile(
      path,
      `has modelVersion ${String(modelVersion)}, expected an integer >= 0`,
    );
  }
  let state: ServerOptimizerState;
  try {
    state = parseServerOptimizerState(record.state);
  } catch (err) {
    invalidFile(path, `is not valid: ${(err as Error).message}`, err);
  }
  return {
    modelVersion: modelVersion as number,
    config: record.config as ServerOptimizerConfig,
    state,
  };
}

/** Checks that the file's optimizer and tensors match the configuration. */
function checkStateFile(
  path: string,
  file: StateFile,
  config: ServerOptimizerConfig,
  tensorSizes: ReadonlyMap<string, number>,
): void {
  const { optimizer } = file.state;
  if (optimizer !== config.optimizer) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `server optimizer state ${path} contains ${optimizer} moments, but ` +
        `serverOptimizer.optimizer is ${config.optimizer}; configure ` +
        `${optimizer}, or delete the file to start ${config.optimizer} ` +
        'from zero moments',
    );
  }
  const saved = file.state.tensors.map(
    (t) => `${t.name} (${t.firstMoment.length})`,
  );
  const expected = [...tensorSizes.entries()]
    .sort(([a], [b]) => compareIds(a, b))
    .map(([name, size]) => `${name} (${size})`);
  if (saved.join(', ') !== expected.join(', ')) {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `server optimizer state ${path} contains moments of tensors ` +
        `[${saved.join(', ')}], but the trainable tensors are ` +
        `[${expected.join(', ')}]; restore the trainable layers, or ` +
        'delete the file to start from zero moments',
    );
  }
}
