/**
 * The aggregation strategy a manifest records, from the aggregator's
 * options. Structural types keep this library free of aggregator imports.
 */

/** Aggregator options that decide how a round's updates were merged. */
export interface StrategyOptions {
  aggregation: string;
  byzantineCount: number;
  trimFraction: number;
  multiKrumSelect: number;
  differentialPrivacy?: { clipNorm: number; noiseMultiplier: number };
}

/** Strategy name and the numeric parameters that shaped its result. */
export interface StrategyDescription {
  /** An aggregation rule such as 'fedavg' or 'krum', or 'dp-fedavg'. */
  strategy: string;
  strategyParams: Record<string, number>;
}

/**
 * Describes the rule that merged a round. Parameters a rule ignores are
 * left out, so that two versions compare equal when their rule was.
 */
export function describeStrategy(
  options: StrategyOptions,
): StrategyDescription {
  const dp = options.differentialPrivacy;
  if (dp !== undefined) {
    return {
      strategy: 'dp-fedavg',
      strategyParams: {
        clipNorm: dp.clipNorm,
        noiseMultiplier: dp.noiseMultiplier,
      },
    };
  }
  const { aggregation } = options;
  const strategyParams: Record<string, number> = {};
  if (aggregation !== 'fedavg') {
    strategyParams.byzantineCount = options.byzantineCount;
  }
  if (aggregation === 'trimmed-mean') {
    strategyParams.trimFraction = options.trimFraction;
  }
  if (aggregation === 'multi-krum') {
    strategyParams.multiKrumSelect = options.multiKrumSelect;
  }
  return { strategy: aggregation, strategyParams };
}
