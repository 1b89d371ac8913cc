/** Signal handling of the download command line. */

const SIGNAL_EXIT_CODES = { SIGINT: 130, SIGTERM: 143 } as const;
type StopSignal = keyof typeof SIGNAL_EXIT_CODES;

/**
 * Signals closer together than this count as one. Ctrl-C signals the whole
 * process group, and `npm run` and tsx forward it too, so node can receive
 * the same SIGINT two or three times within milliseconds.
 */
const REPEATED_SIGNAL_WINDOW_MS = 1000;

/**
 * Aborts `controller` on the first SIGINT or SIGTERM, so downloadGtsrb
 * removes its partial dataset before it rejects. A second signal more than
 * REPEATED_SIGNAL_WINDOW_MS later exits at once; the next run then removes
 * the folder left behind.
 */
export function abortOnSignals(controller: AbortController): {
  received(): StopSignal | undefined;
  dispose(): void;
} {
  let received: StopSignal | undefined;
  let receivedAtMs = 0;
  const onSignal = (signal: StopSignal) => {
    if (received !== undefined) {
      if (Date.now() - receivedAtMs < REPEATED_SIGNAL_WINDOW_MS) return;
      process.exit(SIGNAL_EXIT_CODES[signal]);
    }
    received = signal;
    receivedAtMs = Date.now();
    process.stderr.write(`download-gtsrb: ${signal} received, stopping\n`);
    controller.abort(new Error(`stopped by ${signal}`));
  };
  for (const signal of Object.keys(SIGNAL_EXIT_CODES) as StopSignal[]) {
    process.on(signal, onSignal);
  }
  return {
    received: () => received,
    dispose(): void {
      for (const signal of Object.keys(SIGNAL_EXIT_CODES) as StopSignal[]) {
        process.off(signal, onSignal);
      }
    },
  };
}
