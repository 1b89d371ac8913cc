/**
 * State that a server optimizer carries from round to round, as plain
 * data: `JSON.stringify` writes it and parseServerOptimizerState reads it
 * back. Moments are float64 values stored as JSON numbers, which
 * round-trip exactly because JavaScript prints the shortest decimal that
 * parses to the same double.
 */
import { ErrorCode, FleetError } from '../../protocol/index.ts';
import { compareIds } from './vehicle-update.ts';

/** Server optimizers that applyServerOptimizer implements. */
export const SERVER_OPTIMIZER_NAMES = [
  'fedavgm',
  'fedadagrad',
  'fedadam',
  'fedyogi',
] as const;

export type ServerOptimizerName = (typeof SERVER_OPTIMIZER_NAMES)[number];

/** Format version of ServerOptimizerState, raised on incompatible changes. */
export const SERVER_OPTIMIZER_STATE_FORMAT = 1;

/** Moments of one tensor. */
export interface TensorMoments {
  name: string;
  /** Momentum buffer (FedAvgM) or first moment m (adaptive optimizers). */
  firstMoment: number[];
  /** Second moment v, empty for FedAvgM. */
  secondMoment: number[];
}

/** Server optimizer state between rounds. */
export interface ServerOptimizerState {
  format: typeof SERVER_OPTIMIZER_STATE_FORMAT;
  optimizer: ServerOptimizerName;
  /** Server steps applied so far. */
  step: number;
  /** One entry per trained tensor, sorted by name. */
  tensors: TensorMoments[];
}

/**
 * Returns the state before the first step: zero first moments, and second
 * moments equal to `initialSecondMoment` (none for FedAvgM).
 */
export function createServerOptimizerState(
  optimizer: ServerOptimizerName,
  tensorSizes: ReadonlyMap<string, number>,
  initialSecondMoment: number,
): ServerOptimizerState {
  const names = [...tensorSizes.keys()].sort(compareIds);
  const tensors = names.map((name) => {
    const size = tensorSizes.get(name)!;
    return {
      name,
      firstMoment: new Array<number>(size).fill(0),
      secondMoment:
        optimizer === 'fedavgm'
          ? []
          : new Array<number>(size).fill(initialSecondMoment),
    };
  });
  return { format: SERVER_OPTIMIZER_STATE_FORMAT, optimizer, step: 0, tensors };
}

/**
 * Checks that `value` (for example the output of JSON.parse) is a
 * ServerOptimizerState and returns it typed.
 *
 * @throws {FleetError} INVALID_CONFIG naming the first field that is wrong.
 */
export function parseServerOptimizerState(
  value: unknown,
): ServerOptimizerState {
  const record = asRecord(value, 'optimizer state');
  if (record.format !== SERVER_OPTIMIZER_STATE_FORMAT) {
    throw invalidState(
      `format is ${String(record.format)}, expected ` +
        `${SERVER_OPTIMIZER_STATE_FORMAT}`,
    );
  }
  const optimizer = record.optimizer;
  if (!SERVER_OPTIMIZER_NAMES.some((name) => name === optimizer)) {
    throw invalidState(
      `optimizer is ${String(optimizer)}, expected one of ` +
        SERVER_OPTIMIZER_NAMES.join(', '),
    );
  }
  if (!Number.isSafeInteger(record.step) || (record.step as number) < 0) {
    throw invalidState(
      `step is ${String(record.step)}, expected an integer >= 0`,
    );
  }
  if (!Array.isArray(record.tensors)) {
    throw invalidState('tensors is not an array');
  }
  const tensors = record.tensors.map((entry: unknown, index: number) =>
    parseTensorMoments(entry, index, optimizer as ServerOptimizerName),
  );
  return {
    format: SERVER_OPTIMIZER_STATE_FORMAT,
    optimizer: optimizer as ServerOptimizerName,
    step: record.step as number,
    tensors,
  };
}

function parseTensorMoments(
  entry: unknown,
  index: number,
  optimizer: ServerOptimizerName,
): TensorMoments {
  const record = asRecord(entry, `tensors[${index}]`);
  const { name, firstMoment, secondMoment } = record;
  if (typeof name !== 'string') {
    throw invalidState(`tensors[${index}].name is not a string`);
  }
  checkFiniteArray(firstMoment, `tensor ${name} firstMoment`);
  checkFiniteArray(secondMoment, `tensor ${name} secondMoment`);
  const expectedLength = optimizer === 'fedavgm' ? 0 : firstMoment.length;
  if (secondMoment.length !== expectedLength) {
    throw invalidState(
      `tensor ${name} secondMoment has ${secondMoment.length} values, ` +
        `expected ${expectedLength} for ${optimizer}`,
    );
  }
  return { name, firstMoment, secondMoment };
}

function checkFiniteArray(
  value: unknown,
  label: string,
): asserts value is number[] {
  if (!Array.isArray(value)) throw invalidState(`${label} is not an array`);
  const index = value.findIndex(
    (item) => typeof item !== 'number' || !Number.isFinite(item),
  );
  if (index >= 0) {
    throw invalidState(
      `${label}[${index}] is ${String(value[index])}, expected a finite number`,
    );
  }
}

function asRecord(value: unknown, label: string): Record<string, unknown> {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw invalidState(`${label} is not an object`);
  }
  return value as Record<string, unknown>;
}

function invalidState(detail: string): FleetError {
  return new FleetError(
    ErrorCode.InvalidConfig,
    `invalid server optimizer state: ${detail}`,
  );
}
