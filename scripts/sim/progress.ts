import cliProgress from 'cli-progress';

/**
 * Progress of a simulation: a bar on a terminal, otherwise one line per
 * round on stderr.
 */
export class RoundProgress {
  readonly #bar: cliProgress.SingleBar | undefined;
  readonly #rounds: number;
  #updates = 0;
  #done = 0;

  constructor(rounds: number, vehicles: number, interactive: boolean) {
    this.#rounds = rounds;
    if (interactive) {
      this.#bar = new cliProgress.SingleBar(
        {
          format:
            'round {round}/{rounds} |{bar}| {value}/{total} rounds done, ' +
            '{updates}/' +
            vehicles +
            ' updates, accuracy {accuracy}',
          hideCursor: true,
        },
        cliProgress.Presets.shades_classic,
      );
      this.#bar.start(rounds, 0, {
        round: 0,
        rounds,
        updates: 0,
        accuracy: '-',
      });
    }
  }

  roundOpened(round: number): void {
    this.#updates = 0;
    this.#bar?.update({ round, updates: 0 });
  }

  updateSent(): void {
    this.#updates += 1;
    this.#bar?.update({ updates: this.#updates });
  }

  roundDone(round: number, accuracy: number | undefined): void {
    this.#done += 1;
    const accuracyText = accuracy === undefined ? '-' : accuracy.toFixed(4);
    if (this.#bar !== undefined) {
      this.#bar.update(this.#done, { accuracy: accuracyText });
    } else {
      console.error(
        `round ${round} done (${this.#done}/${this.#rounds}), ` +
          `${this.#updates} updates, accuracy ${accuracyText}`,
      );
    }
  }

  stop(): void {
    this.#bar?.stop();
  }
}
