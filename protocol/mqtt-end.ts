/**
 * Lifecycle helpers of the mqtt.js clients: waiting for the first
 * connection, and ending a client within a bounded time.
 */
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

/**
 * Waits until `client` first connects to `brokerUrl`, and returns at once
 * when it is connected already. When `signal` aborts first, ends the client
 * by force and rejects, so no reconnection timer keeps running.
 */
export async function awaitConnect(
  client: MqttClient,
  brokerUrl: string,
  signal: AbortSignal,
): Promise<void> {
  if (client.connected && !signal.aborted) return;
  try {
    await new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        client.off('connect', onConnect);
        reject(
          new Error(`connection to ${brokerUrl} aborted before it was up`),
        );
      };
      const onConnect = (): void => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      };
      if (signal.aborted) {
        onAbort();
        return;
      }
      client.once('connect', onConnect);
      signal.addEventListener('abort', onAbort, { once: true });
    });
  } catch (err) {
    await client.endAsync(true);
    throw err;
  }
}
