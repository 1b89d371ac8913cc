/**
 * The aggregator's round loop: one RoundRunner at a time, which a
 * rollback replaces. Rounds are counted across runners, so maxRounds
 * holds for the whole run.
 */
import type { StoredModel } from './model-store.ts';
import type { OpenRound } from './round.ts';
import { RoundRunner, type RoundHost } from './round-runner.ts';

/** Steps of replacing the runner, in the order they run. */
export interface RunnerSwitch {
  /** Throws to cancel the switch while the current runner still runs. */
  check(current: RoundRunner): void;
  /**
   * Returns the model the next runner starts from, once the current one
   * has stopped. When it throws, the loop goes on from the stopped
   * runner's model.
   */
  prepare(stopped: RoundRunner): StoredModel;
  /** Runs after the next runner is set and before it starts. */
  finish(
    stopped: RoundRunner,
    model: StoredModel,
    abandoned: OpenRound | undefined,
  ): Promise<void>;
}

/** Options of {@link RoundLoop}. */
export interface RoundLoopOptions {
  /** Rounds to run in all; 0 runs until stopped. */
  maxRounds: number;
  /** Aborted by the aggregator's `stop()`. */
  stopping: AbortSignal;
  /** Builds the host of one runner, with its signal and round budget. */
  hostFor(signal: AbortSignal, maxRounds: number): RoundHost;
}

/** Runs round runners one after another until maxRounds or stop. */
export class RoundLoop {
  readonly #options: RoundLoopOptions;
  #runner: RoundRunner | undefined;
  /** Stops `#runner` alone, when a switch replaces it. */
  #runnerAbort: AbortController | undefined;
  /** The `run()` of `#runner`. */
  #runnerDone: Promise<void> = Promise.resolve();
  /** Rounds completed or abandoned under runners that were replaced. */
  #roundsBefore = 0;
  /** The switch in progress; it never rejects. */
  #switching: Promise<void> | undefined;

  constructor(options: RoundLoopOptions) {
    this.#options = options;
  }

  /** The current runner, once `begin()` ran. */
  get runner(): RoundRunner | undefined {
    return this.#runner;
  }

  /** Rounds closed, failed or abandoned by a switch. */
  get roundsCompleted(): number {
    return this.#roundsBefore + (this.#runner?.roundsCompleted ?? 0);
  }

  get isRoundLimitReached(): boolean {
    const { maxRounds } = this.#options;
    return maxRounds > 0 && this.roundsCompleted >= maxRounds;
  }

  /** Sets the first runner: rounds after `lastRound`, from `model`. */
  begin(model: StoredModel, lastRound: number): void {
    this.#runner = this.#createRunner(model, lastRound);
  }

  /** Runs rounds until maxRounds is reached or `stopping` aborts. */
  async run(): Promise<void> {
    const { stopping } = this.#options;
    while (!this.isRoundLimitReached && !stopping.aborted) {
      this.#runnerDone = this.#runner!.run();
      await this.#runnerDone;
      const switching = this.#switching;
      if (switching === undefined) return;
      await switching;
    }
  }

  /**
   * Stops the current runner, abandoning its open round, and continues
   * with a runner from the model `steps.prepare` returns. Switches run
   * one at a time. A round already closing finishes first.
   *
   * @throws what `steps.check`, `steps.prepare` or `steps.finish` throw.
   */
  async switchRunner(steps: RunnerSwitch): Promise<void> {
    const before = this.#switching ?? Promise.resolve();
    const switching = before.then(() => this.#switch(steps));
    const settled = switching.catch(() => undefined);
    this.#switching = settled;
    try {
      await switching;
    } finally {
      if (this.#switching === settled) this.#switching = undefined;
    }
  }

  async #switch(steps: RunnerSwitch): Promise<void> {
    const stopped = this.#runner!;
    steps.check(stopped);
    const open = stopped.openRound;
    const abandoned = open?.isOpen === true ? open : undefined;
    this.#runnerAbort?.abort();
    stopped.abandonOpenRound();
    await this.#runnerDone;

    this.#roundsBefore += stopped.roundsCompleted + (abandoned ? 1 : 0);
    let model: StoredModel;
    try {
      model = steps.prepare(stopped);
    } catch (err) {
      this.#runner = this.#createRunner(stopped.model, stopped.lastRound);
      throw err;
    }
    this.#runner = this.#createRunner(model, stopped.lastRound);
    await steps.finish(stopped, model, abandoned);
  }

  #createRunner(model: StoredModel, lastRound: number): RoundRunner {
    const abort = new AbortController();
    this.#runnerAbort = abort;
    const { maxRounds, stopping } = this.#options;
    // The runner counts its own rounds against this budget.
    const budget = maxRounds === 0 ? 0 : maxRounds - this.#roundsBefore;
    const signal = AbortSignal.any([stopping, abort.signal]);
    return new RoundRunner(
      this.#options.hostFor(signal, budget),
      model,
      lastRound,
    );
  }
}
