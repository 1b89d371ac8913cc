/**
 * Renyi differential privacy (RDP) of the sampled Gaussian mechanism. Each
 * record (here, each vehicle) joins a step independently with probability
 * q (Poisson subsampling). The sampled contributions, each of L2 norm at
 * most C, are summed, and the sum gets Gaussian noise of standard
 * deviation sigma * C.
 *
 * Source of the formulas: I. Mironov, K. Talwar, L. Zhang, "Renyi
 * Differential Privacy of the Sampled Gaussian Mechanism", 2019,
 * https://arxiv.org/abs/1908.10530, Section 3.3. The mechanism is
 * (alpha, log(A_alpha) / (alpha - 1))-RDP, where A_alpha is the alpha-th
 * moment of the likelihood ratio between the mixture
 * (1 - q) N(0, sigma^2) + q N(1, sigma^2) and N(0, sigma^2). The formulas
 * were checked against the implementations in tensorflow/privacy
 * (tensorflow_privacy/privacy/analysis/rdp_privacy_accountant.py) and
 * pytorch/opacus (opacus/accountants/analysis/rdp.py), but no code was
 * taken from them.
 *
 * RDP composes by addition: T steps at the same (q, sigma) give T times
 * the per-step values, and steps at different rates add their values.
 */
import { logAddExp } from './log-math.ts';
import { logMomentFractionalOrder } from './rdp-fractional.ts';

/**
 * RDP orders alpha tracked by default: the list of the DP-SGD privacy
 * statement in tensorflow/privacy
 * (tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_lib.py:
 * 1.25 to 4.5, 5 to 63, 128, 256, 512) plus 64. Small orders give the
 * best epsilon when the noise is small or the steps many, large orders
 * when the noise is large.
 */
const SMALL_ORDERS = [1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5];
const INTEGER_ORDERS = Array.from({ length: 60 }, (_, i) => i + 5);
export const DEFAULT_RDP_ORDERS: readonly number[] = Object.freeze([
  ...SMALL_ORDERS,
  ...INTEGER_ORDERS,
  128,
  256,
  512,
]);

/** Largest order accepted; integer orders cost O(alpha) each. */
export const MAX_RDP_ORDER = 100_000;

/**
 * Checks the sampling rate and noise multiplier of one step.
 *
 * @throws {RangeError} when q is outside [0, 1] or sigma is negative or
 *   not finite.
 */
export function checkMechanism(samplingRate: number, noiseMultiplier: number) {
  if (!(samplingRate >= 0 && samplingRate <= 1)) {
    throw new RangeError(
      `sampling rate must be in [0, 1], got ${samplingRate}`,
    );
  }
  if (!(noiseMultiplier >= 0) || !Number.isFinite(noiseMultiplier)) {
    throw new RangeError(
      `noise multiplier must be a finite number >= 0, got ${noiseMultiplier}`,
    );
  }
}

/**
 * Checks a list of RDP orders.
 *
 * @throws {RangeError} when the list is empty or an order is not a number
 *   in (1, MAX_RDP_ORDER].
 */
export function checkOrders(orders: readonly number[]): void {
  if (orders.length === 0) {
    throw new RangeError('orders must contain at least one RDP order');
  }
  for (const order of orders) {
    if (!(order > 1 && order <= MAX_RDP_ORDER)) {
      throw new RangeError(
        `RDP order must be in (1, ${MAX_RDP_ORDER}], got ${order}`,
      );
    }
  }
}

/**
 * Returns log(sum of e^terms), shifting by the largest term so that no
 * exponential overflows.
 */
function logSumExp(terms: readonly number[]): number {
  let max = -Infinity;
  for (const term of terms) max = Math.max(max, term);
  if (max === -Infinity) return -Infinity;
  let sum = 0;
  for (const term of terms) sum += Math.exp(term - max);
  return max + Math.log(sum);
}

/** Returns log(e^x - 1) for x > 0 without overflow or lost digits. */
function logExpm1(x: number): number {
  return x > 1 ? x + Math.log(-Math.expm1(-x)) : Math.log(Math.expm1(x));
}

/**
 * Computes log(A_alpha) for integer alpha >= 2 and 0 < q < 1 by the exact
 * binomial expansion A_alpha =
 * sum_k C(alpha, k) q^k (1 - q)^(alpha - k) e^((k^2 - k) / (2 sigma^2)).
 * The binomial weights sum to 1 and the k = 0 and k = 1 exponents are 0, so
 * A_alpha = 1 + sum_{k >= 2} C(alpha, k) q^k (1 - q)^(alpha - k)
 * (e^((k^2 - k) / (2 sigma^2)) - 1). Every term of that sum is positive,
 * which keeps the digits of log(A_alpha) when A_alpha is close to 1.
 */
function logMomentIntegerOrder(q: number, sigma: number, alpha: number) {
  const logQ = Math.log(q);
  const logOneMinusQ = Math.log1p(-q);
  const twoVariance = 2 * sigma * sigma;
  const terms: number[] = [];
  let logBinomial = Math.log(alpha);
  for (let k = 2; k <= alpha; k++) {
    logBinomial += Math.log((alpha - k + 1) / k);
    const exponent = (k * k - k) / twoVariance;
    terms.push(
      logBinomial + k * logQ + (alpha - k) * logOneMinusQ + logExpm1(exponent),
    );
  }
  return logAddExp(0, logSumExp(terms));
}

/**
 * Computes the RDP of one step of the sampled Gaussian mechanism at one
 * order: 0 when q = 0, Infinity when sigma = 0 and q > 0,
 * alpha / (2 sigma^2) when q = 1 (the plain Gaussian mechanism), and
 * log(A_alpha) / (alpha - 1) otherwise.
 */
function computeStepRdp(q: number, sigma: number, alpha: number): number {
  if (q === 0) return 0;
  if (sigma === 0) return Infinity;
  if (q === 1) return alpha / (2 * sigma * sigma);

  const logMoment = Number.isInteger(alpha)
    ? logMomentIntegerOrder(q, sigma, alpha)
    : logMomentFractionalOrder(q, sigma, alpha);
  return logMoment / (alpha - 1);
}

/**
 * Computes the RDP of `steps` compositions of the sampled Gaussian
 * mechanism at each order.
 *
 * @param samplingRate q, the probability that a record joins a step.
 * @param noiseMultiplier sigma, noise standard deviation over the L2
 *   sensitivity (the clipping norm).
 * @param steps number of steps at this (q, sigma), RDP being linear in it.
 * @param orders RDP orders alpha, each in (1, MAX_RDP_ORDER].
 * @returns the RDP epsilon at each order, in the same order, or Infinity
 *   where the mechanism gives no guarantee, never NaN.
 * @throws {RangeError} on an argument out of range (see checkMechanism,
 *   checkOrders) or when steps is not a non-negative safe integer.
 */
export function computeRdp(
  samplingRate: number,
  noiseMultiplier: number,
  steps: number,
  orders: readonly number[] = DEFAULT_RDP_ORDERS,
): number[] {
  checkMechanism(samplingRate, noiseMultiplier);
  checkOrders(orders);
  if (!Number.isSafeInteger(steps) || steps < 0) {
    throw new RangeError(`steps must be an integer >= 0, got ${steps}`);
  }

  return orders.map((alpha) => {
    if (steps === 0) return 0;
    return steps * computeStepRdp(samplingRate, noiseMultiplier, alpha);
  });
}
