/**
 * Conversion of an RDP curve (epsilon at each order alpha) into an
 * (epsilon, delta) differential privacy guarantee. Every order gives a
 * valid epsilon for the chosen delta, so the smallest one is reported.
 */

/**
 * Conversion rule from RDP to (epsilon, delta):
 * - 'standard': epsilon = rdp + log(1/delta) / (alpha - 1). I. Mironov,
 *   "Renyi Differential Privacy", 2017, https://arxiv.org/abs/1702.07476,
 *   Proposition 3. The older tensorflow/privacy accountant
 *   (privacy/analysis/rdp_accountant.py) used this rule.
 * - 'tight': epsilon = rdp + log((alpha - 1) / alpha)
 *   - (log(delta) + log(alpha)) / (alpha - 1). B. Balle et al.,
 *   "Hypothesis Testing Interpretations and Renyi Differential Privacy",
 *   AISTATS 2020, https://arxiv.org/abs/1905.09982, Theorem 21, and
 *   C. Canonne, G. Kamath, T. Steinke, "The Discrete Gaussian for
 *   Differential Privacy", 2020, https://arxiv.org/abs/2004.00010,
 *   Proposition 12. It is never larger than 'standard'.
 */
export type RdpConversion = 'tight' | 'standard';

/** An (epsilon, delta) guarantee and the RDP order that gave it. */
export interface PrivacySpent {
  epsilon: number;
  delta: number;
  /** Order with the smallest epsilon; the first order if all are Infinity. */
  order: number;
}

/**
 * Orders at or below this value are skipped by the 'tight' rule, whose
 * log term loses its digits as alpha approaches 1, as tensorflow/privacy
 * does (tensorflow_privacy/privacy/analysis/rdp_privacy_accountant.py).
 * The orders in DEFAULT_RDP_ORDERS are all above it.
 */
const MIN_TIGHT_ORDER = 1.01;

/** Epsilon at one order by the 'tight' rule, in tensorflow/privacy's form. */
function tightEpsilon(alpha: number, rdp: number, delta: number): number {
  if (rdp === Infinity) return Infinity;
  // The KL divergence (RDP in the limit alpha -> 1, never above rdp at a
  // larger order) bounds delta at epsilon = 0 by sqrt(1 - e^-KL), so
  // epsilon is 0 when that bound is below delta, as in tensorflow/privacy.
  if (delta * delta + Math.expm1(-rdp) > 0) return 0;
  if (alpha <= MIN_TIGHT_ORDER) return Infinity;
  return rdp + Math.log1p(-1 / alpha) - Math.log(delta * alpha) / (alpha - 1);
}

function standardEpsilon(alpha: number, rdp: number, delta: number): number {
  return rdp - Math.log(delta) / (alpha - 1);
}

/**
 * Converts an RDP curve into the smallest epsilon at `delta`.
 *
 * @param orders RDP orders alpha, each > 1.
 * @param rdp RDP epsilon at each order (>= 0, may be Infinity).
 * @param delta target delta, in (0, 1).
 * @param conversion rule, 'tight' by default (see RdpConversion).
 * @returns epsilon >= 0 (Infinity when no order gives a finite bound),
 *   never NaN, with the order that gave it.
 * @throws {RangeError} when the lists differ in length or are empty, an
 *   order is not above 1, an rdp value is negative or NaN, or delta is
 *   outside (0, 1).
 */
export function convertRdpToEpsilon(
  orders: readonly number[],
  rdp: readonly number[],
  delta: number,
  conversion: RdpConversion = 'tight',
): PrivacySpent {
  if (orders.length === 0 || orders.length !== rdp.length) {
    throw new RangeError(
      `orders and rdp must be non-empty lists of equal length, got ` +
        `${orders.length} orders and ${rdp.length} rdp values`,
    );
  }
  if (!(delta > 0 && delta < 1)) {
    throw new RangeError(`delta must be in (0, 1), got ${delta}`);
  }

  let best: PrivacySpent = { epsilon: Infinity, delta, order: orders[0] };
  for (let i = 0; i < orders.length; i++) {
    const alpha = orders[i];
    const value = rdp[i];
    if (!(alpha > 1)) {
      throw new RangeError(`RDP order must be above 1, got ${alpha}`);
    }
    if (!(value >= 0)) {
      throw new RangeError(`RDP at order ${alpha} must be >= 0, got ${value}`);
    }
    const epsilon =
      conversion === 'tight'
        ? tightEpsilon(alpha, value, delta)
        : standardEpsilon(alpha, value, delta);
    if (epsilon < best.epsilon) best = { epsilon, delta, order: alpha };
  }
  best.epsilon = Math.max(0, best.epsilon);
  return best;
}
