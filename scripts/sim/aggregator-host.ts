/**
 * Runs the simulation's aggregator and replaces it with a new instance on
 * the same state directory when a fault restarts it.
 */
import { setTimeout as delay } from 'node:timers/promises';
import { Aggregator, type AggregatorOptions } from '../../aggregator/index.ts';
import type { Logger } from '../../protocol/index.ts';
import { settleWithin } from './timing.ts';

/** Time the crashed instance gets to stop before the new one starts anyway. */
const CRASH_STOP_TIMEOUT_MS = 5000;

/** Outcome of one aggregator restart. */
export interface AggregatorRestart {
  /** Round that was open, or the last one opened, when it crashed. */
  interruptedRound: number;
  /** Model version before and after the restart; equal when nothing leaked. */
  modelVersionBefore: number;
  modelVersionAfter: number;
  /** False when the crashed instance's `stop()` had not finished in time. */
  isStopped: boolean;
}

/**
 * Holds the current Aggregator. The requested number of rounds counts
 * closed and failed rounds over every instance, so a restarted instance
 * runs only the rounds still missing.
 */
export class AggregatorHost {
  readonly #options: AggregatorOptions;
  readonly #rounds: number;
  readonly #onInstance: (aggregator: Aggregator) => void;
  readonly #log: Logger;
  #current: Aggregator | undefined;
  #roundsCompleted = 0;
  #restarting: Promise<unknown> | undefined;

  /**
   * @param options aggregator options; `brokerUrl` is set per instance and
   *   `maxRounds` from `rounds`.
   * @param onInstance called for every instance before it starts.
   */
  constructor(init: {
    options: Omit<AggregatorOptions, 'brokerUrl' | 'maxRounds'>;
    rounds: number;
    onInstance: (aggregator: Aggregator) => void;
    log: Logger;
  }) {
    this.#options = { ...init.options, brokerUrl: '', maxRounds: init.rounds };
    this.#rounds = init.rounds;
    this.#onInstance = init.onInstance;
    this.#log = init.log;
  }

  /** The running instance. */
  get current(): Aggregator {
    if (this.#current === undefined) throw new Error('aggregator not started');
    return this.#current;
  }

  /** Closed and failed rounds over every instance. */
  get roundsCompleted(): number {
    return this.#roundsCompleted;
  }

  /** Creates and starts the first instance. */
  async start(brokerUrl: string): Promise<void> {
    await this.#startInstance(brokerUrl, this.#rounds);
  }

  /**
   * Crashes the current instance and starts a new one on `brokerUrl`
   * after `pauseMs`. `cut` must sever the instance's broker connection at
   * once, so that the old instance can publish nothing more. Its `stop()`
   * then abandons the open round, as a crash would. The new instance runs
   * the rounds still missing.
   */
  restart(
    brokerUrl: string,
    pauseMs: number,
    cut: () => void,
  ): Promise<AggregatorRestart> {
    const old = this.current;
    const interruptedRound = old.currentRound;
    const modelVersionBefore = old.currentModelVersion;
    cut();
    const stopped = settleWithin(old.stop(), CRASH_STOP_TIMEOUT_MS);
    const restarted = (async (): Promise<AggregatorRestart> => {
      await delay(pauseMs);
      const isStopped = await stopped;
      if (!isStopped) {
        this.#log.warn(
          { round: interruptedRound, timeoutMs: CRASH_STOP_TIMEOUT_MS },
          'crashed aggregator did not stop in time, starting a new one anyway',
        );
      }
      const remaining = this.#rounds - this.#roundsCompleted;
      await this.#startInstance(brokerUrl, Math.max(1, remaining));
      return {
        interruptedRound,
        modelVersionBefore,
        modelVersionAfter: this.current.currentModelVersion,
        isStopped,
      };
    })();
    this.#restarting = restarted;
    const clear = (): void => {
      this.#restarting = undefined;
    };
    void restarted.then(clear, clear);
    return restarted;
  }

  /** Resolves once the requested rounds are done, across restarts. */
  async whenFinished(): Promise<void> {
    for (;;) {
      const instance = this.current;
      await instance.whenFinished();
      if (this.#restarting !== undefined) {
        await this.#restarting;
        continue;
      }
      if (instance === this.#current) return;
    }
  }

  async stop(): Promise<void> {
    await this.#restarting?.catch(() => undefined);
    await this.#current?.stop();
  }

  async #startInstance(brokerUrl: string, maxRounds: number): Promise<void> {
    const aggregator = new Aggregator({
      ...this.#options,
      brokerUrl,
      maxRounds,
    });
    aggregator.on('round-closed', () => (this.#roundsCompleted += 1));
    aggregator.on('round-failed', () => (this.#roundsCompleted += 1));
    this.#onInstance(aggregator);
    this.#current = aggregator;
    await aggregator.start();
  }
}
