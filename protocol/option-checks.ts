/** Checks of option values, shared by the aggregator's and the depot's options. */
import { ErrorCode, FleetError } from './errors.ts';
import { MAX_TIMER_MS } from './mqtt-end.ts';

/** Option checks whose errors start with one subject, such as "depot option". */
export interface OptionChecks {
  /**
   * Throws a FleetError INVALID_CONFIG that names the option, its value
   * and what was expected.
   */
  invalid(option: string, value: unknown, expected: string): never;
  /** Rejects a value that is not a safe integer of at least `min`. */
  requireInteger(option: string, value: number, min: number): void;
  /**
   * Rejects a value that is not an integer from `min` to MAX_TIMER_MS
   * milliseconds, because Node's setTimeout uses 1 ms for a longer delay.
   */
  requireDuration(option: string, value: number, min: number): void;
  /** Rejects a value that is not a non-empty string, with a TypeError. */
  requireText(option: string, value: unknown): void;
}

/**
 * Creates the option checks of one set of options. Every error message
 * starts with `subject`, for example `depot option stateDir is ...`.
 */
export function optionChecks(subject: string): OptionChecks {
  const invalid = (option: string, value: unknown, expected: string): never => {
    throw new FleetError(
      ErrorCode.InvalidConfig,
      `${subject} ${option} is ${String(value)}, expected ${expected}`,
    );
  };
  return {
    invalid,
    requireInteger(option, value, min) {
      if (!Number.isSafeInteger(value) || value < min) {
        invalid(option, value, `an integer >= ${min}`);
      }
    },
    requireDuration(option, value, min) {
      if (!Number.isSafeInteger(value) || value < min || value > MAX_TIMER_MS) {
        invalid(option, value, `an integer from ${min} to ${MAX_TIMER_MS} ms`);
      }
    },
    requireText(option, value) {
      if (typeof value !== 'string' || value.length === 0) {
        throw new TypeError(
          `${subject} ${option} must be a non-empty string, got ` +
            `${JSON.stringify(value)}`,
        );
      }
    },
  };
}
