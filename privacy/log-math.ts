/**
 * Arithmetic on logarithms for the privacy accountant. The moments it sums
 * overflow a double long before their logarithms do, so every sum is taken
 * as log-sum-exp and the complementary error function is evaluated as its
 * logarithm.
 */

const LOG_SQRT_PI = 0.5 * Math.log(Math.PI);

/** Below this argument erfc is 1 - erf (series), above it the fraction. */
const SERIES_LIMIT = 2;

/** Relative step below which the series and the fraction stop. */
const TOLERANCE = 1e-17;

/** Iteration cap, far above the steps either expansion needs on its range. */
const MAX_ITERATIONS = 10_000;

/**
 * Returns log(e^a + e^b) without overflow. Either argument may be
 * -Infinity, the logarithm of zero.
 */
export function logAddExp(a: number, b: number): number {
  const high = Math.max(a, b);
  const low = Math.min(a, b);
  if (low === -Infinity) return high;
  return high + Math.log1p(Math.exp(low - high));
}

/**
 * Returns log(e^a - e^b) for a >= b. Equal arguments give -Infinity.
 *
 * @throws {RangeError} when a < b, because the difference would be negative.
 */
export function logSubExp(a: number, b: number): number {
  if (a < b) {
    throw new RangeError(
      `logSubExp needs a >= b for a non-negative difference, got ${a} < ${b}`,
    );
  }
  if (b === -Infinity) return a;
  if (a === b) return -Infinity;
  return a + Math.log(-Math.expm1(b - a));
}

/**
 * Computes erf(x) for 0 <= x < SERIES_LIMIT from the series of positive terms
 * erf(x) = 2/sqrt(pi) * e^(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)).
 * No term cancels another, unlike in the alternating Taylor series.
 */
function erfBySeries(x: number): number {
  const twoXSquared = 2 * x * x;
  let term = x;
  let sum = x;
  for (let n = 1; n < MAX_ITERATIONS; n++) {
    term *= twoXSquared / (2 * n + 1);
    sum += term;
    if (term < sum * TOLERANCE) break;
  }
  return (2 / Math.sqrt(Math.PI)) * Math.exp(-x * x) * sum;
}

/**
 * Computes log(sqrt(pi) * e^(x^2) * erfc(x)) for x >= SERIES_LIMIT from the
 * continued fraction sqrt(pi) e^(x^2) erfc(x) =
 * 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), with partial numerators n/2
 * (Laplace's fraction, as quoted in
 * https://issues.apache.org/jira/browse/NUMBERS-177). It is evaluated with
 * the modified Lentz method.
 */
function logScaledErfcByFraction(x: number): number {
  const tiny = 1e-300;
  let value = x;
  let c = x;
  let d = 0;
  for (let n = 1; n < MAX_ITERATIONS; n++) {
    const numerator = n / 2;
    d = x + numerator * d;
    if (d === 0) d = tiny;
    c = x + numerator / c;
    if (c === 0) c = tiny;
    d = 1 / d;
    const factor = c * d;
    value *= factor;
    if (Math.abs(factor - 1) < TOLERANCE) break;
  }
  return -Math.log(value);
}

/**
 * Computes log(erfc(x)) for any finite x, accurate far into the tail
 * (log erfc(1000) is about -1000007.48, where erfc itself underflows).
 * Checked against mpmath at 40 digits: the relative error of erfc is
 * below 1e-15 except just below x = 2, where 1 - erf loses digits and it
 * reaches about 1.5e-13.
 *
 * @throws {RangeError} when x is NaN.
 */
export function logErfc(x: number): number {
  if (Number.isNaN(x)) throw new RangeError('logErfc argument is NaN');
  if (x === Infinity) return -Infinity;
  if (x === -Infinity) return Math.LN2;

  // erfc(x) = 1 - erf(x) and erfc(-x) = 1 + erf(x), and log1p keeps the
  // digits of small erf values.
  if (Math.abs(x) < SERIES_LIMIT) {
    const erf = erfBySeries(Math.abs(x));
    return x >= 0 ? Math.log1p(-erf) : Math.log1p(erf);
  }
  const logScaled = -x * x - LOG_SQRT_PI + logScaledErfcByFraction(Math.abs(x));
  if (x > 0) return logScaled;
  return Math.log(2 - Math.exp(logScaled));
}
