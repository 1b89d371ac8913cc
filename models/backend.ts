/**
 * Chooses the TF.js backend that trains. The native TensorFlow bindings are
 * fastest, but their install script downloads libtensorflow and fails on
 * machines without network access, so they are optional. The wasm backend
 * ships inside its npm package and trains the model about 30 times faster
 * than the pure-JS cpu backend.
 */
import * as tf from '@tensorflow/tfjs';

import type { Logger } from '../protocol/index.ts';

export type TrainingBackend = 'tensorflow-gpu' | 'tensorflow' | 'wasm' | 'cpu';

/** Backends in order of preference. */
export const TRAINING_BACKENDS: readonly TrainingBackend[] = [
  'tensorflow-gpu',
  'tensorflow',
  'wasm',
  'cpu',
];

/** npm package and TF.js backend name of each training backend. */
const BACKEND_SOURCES: Record<
  TrainingBackend,
  { pkg: string; tfName: string }
> = {
  'tensorflow-gpu': { pkg: '@tensorflow/tfjs-node-gpu', tfName: 'tensorflow' },
  tensorflow: { pkg: '@tensorflow/tfjs-node', tfName: 'tensorflow' },
  wasm: { pkg: '@tensorflow/tfjs-backend-wasm', tfName: 'wasm' },
  cpu: { pkg: '@tensorflow/tfjs', tfName: 'cpu' },
};

let selected: TrainingBackend | undefined;
let pending: Promise<TrainingBackend> | undefined;

/**
 * Selects the training backend and makes it the active TF.js backend:
 * tfjs-node-gpu, then tfjs-node, then wasm, then cpu. Logs the one it got
 * at info and why each better one failed at debug.
 *
 * Idempotent: without `preferred`, a second call returns the backend
 * selected before. With `preferred` (one of TRAINING_BACKENDS), only that
 * backend is tried.
 *
 * @throws {RangeError} when `preferred` is not a known backend name.
 * @throws {Error} when `preferred` cannot load; the message names the
 *   package and the cause.
 */
export async function selectTrainingBackend(
  log?: Logger,
  preferred?: string,
): Promise<TrainingBackend> {
  if (preferred !== undefined && !isTrainingBackend(preferred)) {
    throw new RangeError(
      `unknown training backend ${JSON.stringify(preferred)}; expected one ` +
        `of ${TRAINING_BACKENDS.join(', ')}`,
    );
  }
  if (
    selected !== undefined &&
    (preferred === undefined || preferred === selected)
  ) {
    if (tf.getBackend() !== BACKEND_SOURCES[selected].tfName) {
      await tf.setBackend(BACKEND_SOURCES[selected].tfName);
    }
    return selected;
  }

  // Serialise selections so that concurrent callers share one attempt.
  const previous = pending ?? Promise.resolve(undefined);
  const attempt = previous
    .catch(() => undefined)
    .then(() =>
      preferred === undefined
        ? (selected ?? selectFirstWorking(log))
        : selectPreferred(preferred, log),
    );
  pending = attempt;
  return attempt;
}

/** Returns the backend selectTrainingBackend chose, if any. */
export function currentTrainingBackend(): TrainingBackend | undefined {
  return selected;
}

/**
 * Returns true when the active TF.js backend has a kernel for the kernel
 * gradient of tf.conv2d (wasm in tfjs 4.22 has none).
 */
export function hasConvKernelGradient(): boolean {
  return tf.getKernel('Conv2DBackpropFilter', tf.getBackend()) !== undefined;
}

function isTrainingBackend(name: string): name is TrainingBackend {
  return (TRAINING_BACKENDS as readonly string[]).includes(name);
}

async function selectFirstWorking(log?: Logger): Promise<TrainingBackend> {
  for (const backend of TRAINING_BACKENDS) {
    try {
      await activate(backend);
    } catch (err) {
      log?.debug({ backend, err }, 'training backend unavailable');
      continue;
    }
    return remember(backend, log);
  }
  // Unreachable in practice: the cpu backend ships inside @tensorflow/tfjs.
  throw new Error(
    `no TF.js training backend could load; tried ${TRAINING_BACKENDS.join(', ')}`,
  );
}

async function selectPreferred(
  backend: TrainingBackend,
  log?: Logger,
): Promise<TrainingBackend> {
  try {
    await activate(backend);
  } catch (err) {
    const { pkg } = BACKEND_SOURCES[backend];
    throw new Error(
      `training backend ${backend} failed to load from ${pkg}: ` +
        `${(err as Error).message}; install ${pkg} or choose another backend`,
      { cause: err },
    );
  }
  return remember(backend, log);
}

function remember(backend: TrainingBackend, log?: Logger): TrainingBackend {
  selected = backend;
  log?.info(
    { backend, tfBackend: tf.getBackend() },
    'training backend selected',
  );
  return backend;
}

/** Imports the backend's package when needed and makes it active. */
async function activate(backend: TrainingBackend): Promise<void> {
  const { pkg, tfName } = BACKEND_SOURCES[backend];
  if (backend === 'tensorflow-gpu' || backend === 'tensorflow') {
    // A variable specifier keeps TypeScript from resolving an optional
    // package that is usually not installed.
    const specifier: string = pkg;
    await import(specifier);
  } else if (backend === 'wasm') {
    await import('@tensorflow/tfjs-backend-wasm');
  }

  // setBackend throws when no package registered `tfName`, and returns
  // false (after logging a warning) when initialisation fails.
  const ok = await tf.setBackend(tfName);
  if (!ok) throw new Error(`TF.js backend ${tfName} failed to initialise`);
  await tf.ready();
}
