/** Ending an mqtt.js client within a bounded time, shared by the clients. */
import type { MqttClient } from 'mqtt';

/**
 * Ends `client` within about `timeoutMs`: gracefully while connected, so
 * that QoS 1 messages in flight complete, and by force when not connected.
 * When either takes longer, the socket is destroyed, which drops the
 * messages still in flight.
 */
export async function endClient(
  client: MqttClient,
  timeoutMs: number,
): Promise<void> {
  if (!client.connected && client.stream.destroyed) {
    // A forced end would wait for a 'close' event that this socket has
    // already emitted, so the client is ended without waiting.
    client.end(true);
    return;
  }
  const ending = client.connected ? client.endAsync() : client.endAsync(true);
  if (await settleWithin(ending, timeoutMs)) return;
  // A graceful end waits for every missing PUBACK. A second end() is a
  // no-op in mqtt.js 5, so only destroying the socket stops the wait.
  client.stream.destroy();
}

/**
 * Waits for `promise` at most `timeoutMs`. Resolves true when it resolved
 * in time and false on timeout, and rejects when it rejected in time.
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
    return await Promise.race([promise.then(() => true as const), timedOut]);
  } finally {
    clearTimeout(timer);
  }
}

/** Longest delay setTimeout honours: a longer one fires at once. */
export const MAX_TIMER_MS = 2 ** 31 - 1;
