/** Wall-clock timing helpers of the benchmark. */

/** Wall times of repeated runs, in seconds. */
export interface Timing {
  best: number;
  all: number[];
}

/** Runs `fn` once and returns its wall time in seconds. */
export async function timeOnce(fn: () => unknown): Promise<number> {
  const started = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - started) / 1e9;
}

/** Runs `fn` `repeats` times and returns every wall time and the best. */
export async function timeRepeats(
  repeats: number,
  fn: () => unknown,
): Promise<Timing> {
  const all: number[] = [];
  for (let i = 0; i < repeats; i++) all.push(await timeOnce(fn));
  return timingOf(all);
}

/** Bytes per second as GB/s (10^9 bytes). */
export function gigabytesPerSecond(bytes: number, seconds: number): number {
  return bytes / seconds / 1e9;
}

/** Timing of the given wall times. */
export function timingOf(all: number[]): Timing {
  return { best: Math.min(...all), all };
}
