/** Small waiting helpers of the simulator. */
import { setTimeout as delay } from 'node:timers/promises';

/**
 * Waits for `promise` at most `timeoutMs`. Resolves true when it settled
 * in time (a rejection counts as settled and is swallowed) and false on
 * timeout.
 */
export async function settleWithin(
  promise: Promise<unknown>,
  timeoutMs: number,
): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), timeoutMs);
  });
  try {
    return await Promise.race([
      promise.then(
        () => true as const,
        () => true as const,
      ),
      timedOut,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Polls `isDone` every `intervalMs` until it returns true or `timeoutMs`
 * has passed; resolves with its last result.
 */
export async function waitUntil(
  isDone: () => boolean,
  timeoutMs: number,
  intervalMs = 100,
): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!isDone()) {
    if (Date.now() >= deadline) return false;
    await delay(intervalMs);
  }
  return true;
}
