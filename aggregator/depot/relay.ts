/**
 * Rules for the messages the depot copies between the fleet broker and
 * the depot broker, and the copying itself. The round task and everything
 * under `releases/` (notices, candidate notices, chunks) go down, and the
 * vehicles' statuses and reports go up. Payloads are copied unchanged, so
 * signed release notices stay verifiable on the vehicles.
 */
import { createHash } from 'node:crypto';
import type { MqttClient } from 'mqtt';
import type { FleetTopics, Logger } from '../../protocol/index.ts';
import { subscribe, type DepotSide } from './connection.ts';

/**
 * Max number of topics per side whose last relayed payload RelayEchoFilter
 * keeps.
 */
const MAX_REMEMBERED_TOPICS = 10_000;

/**
 * Number of skipped copies within ECHO_WINDOW_MS that makes the filter warn.
 */
const ECHO_WARN_COUNT = 20;

/** Window in which skipped copies are counted, in milliseconds. */
const ECHO_WINDOW_MS = 10_000;

/** Filters of the fleet broker's topics that the depot copies down. */
export function downstreamRelayFilters(topics: FleetTopics): string[] {
  return [`${topics.prefix}/rounds/#`, `${topics.prefix}/releases/#`];
}

/** Filters of the depot broker's topics that the depot copies up. */
export function upstreamRelayFilters(topics: FleetTopics): string[] {
  return [topics.allStatus(), topics.allReports()];
}

/** True for a fleet broker topic that the depot copies to its broker. */
export function isRelayedDown(topics: FleetTopics, topic: string): boolean {
  return (
    topic.startsWith(`${topics.prefix}/rounds/`) ||
    topic.startsWith(`${topics.prefix}/releases/`)
  );
}

/** True for a depot broker topic that the depot copies to the fleet. */
export function isRelayedUp(topics: FleetTopics, topic: string): boolean {
  const vehicleId = topics.vehicleIdOf(topic);
  if (vehicleId === undefined) return false;
  return (
    topic === topics.status(vehicleId) || topic === topics.report(vehicleId)
  );
}

/**
 * Publishes a copy of one message on `target` with QoS 1, and logs a
 * failure. Every relayed topic carries retained state in this protocol
 * (round task, releases, chunks, statuses, reports), so the copy is always
 * retained. The retain flag of the received message cannot decide this,
 * because an MQTT 3.1.1 broker clears it on a message it forwards to an
 * existing subscription (conformance rule MQTT-3.3.1-9). An empty payload stays
 * empty, so a cleared retained message is cleared on the other broker too.
 */
export function relayMessage(
  target: MqttClient,
  to: DepotSide,
  topic: string,
  payload: Buffer,
  log: Logger,
): void {
  target.publish(topic, payload, { qos: 1, retain: true }, (err) => {
    if (err === undefined || err === null) {
      log.trace({ to, topic, bytes: payload.length }, 'message relayed');
      return;
    }
    log.warn({ err, to, topic, bytes: payload.length }, 'relay failed');
  });
}

/**
 * Keeps the SHA-256 of the payload last relayed on each topic to each
 * side, and skips a message whose payload equals it. When the two URLs
 * reach one broker under different addresses (a port forward, or a LAN
 * address and a loopback one), every copy the depot publishes comes back
 * on the subscription it was copied from. Without this filter the depot
 * would copy it back and forth forever.
 *
 * The filter also skips a genuine repeat of the last payload, which is
 * harmless, because the target broker retains that payload already.
 * Call `clear` for a side whose broker lost its retained messages, so
 * that everything is copied again.
 * NOTE: two different payloads published on one topic within the time a
 * copy takes to come back can still circulate between them. The start
 * check in broker-addresses.ts catches the common same-broker cases.
 */
export class RelayEchoFilter {
  readonly #lastDigests = new Map<DepotSide, Map<string, string>>([
    ['upstream', new Map()],
    ['downstream', new Map()],
  ]);
  readonly #log: Logger;
  #windowStartMs = -Infinity;
  #skipsInWindow = 0;
  #hasWarned = false;

  constructor(log: Logger) {
    this.#log = log;
  }

  /**
   * Returns true when `payload` on `topic` should be copied to `to`, and
   * records it as the last payload copied there.
   */
  admit(to: DepotSide, topic: string, payload: Buffer): boolean {
    const digests = this.#lastDigests.get(to)!;
    const digest = createHash('sha256').update(payload).digest('base64');
    if (digests.get(topic) === digest) {
      this.#countSkip(to, topic);
      return false;
    }
    // Re-inserted, so that the Map's order is the order of last use.
    digests.delete(topic);
    digests.set(topic, digest);
    if (digests.size > MAX_REMEMBERED_TOPICS) {
      digests.delete(digests.keys().next().value as string);
    }
    return true;
  }

  /** Forgets what was copied to `to`. */
  clear(to: DepotSide): void {
    this.#lastDigests.get(to)!.clear();
  }

  #countSkip(to: DepotSide, topic: string): void {
    this.#log.debug({ to, topic }, 'copy of the last relayed message skipped');
    const now = Date.now();
    if (now - this.#windowStartMs > ECHO_WINDOW_MS) {
      this.#windowStartMs = now;
      this.#skipsInWindow = 0;
    }
    this.#skipsInWindow += 1;
    if (this.#skipsInWindow < ECHO_WARN_COUNT || this.#hasWarned) return;
    this.#hasWarned = true;
    this.#log.warn(
      { to, topic, skipped: this.#skipsInWindow, windowMs: ECHO_WINDOW_MS },
      'relayed messages keep coming back, upstream and downstream may be ' +
        'one broker',
    );
  }
}

/** The copying between the two brokers, with RelayEchoFilter in front. */
export class Relay {
  readonly #topics: FleetTopics;
  readonly #log: Logger;
  readonly #echoes: RelayEchoFilter;

  constructor(topics: FleetTopics, log: Logger) {
    this.#topics = topics;
    this.#log = log;
    this.#echoes = new RelayEchoFilter(log);
  }

  /** Copies one message to `target`, unless it is an echo of a copy. */
  copy(
    target: MqttClient | undefined,
    to: DepotSide,
    topic: string,
    payload: Buffer,
  ): void {
    if (target === undefined) return;
    if (!this.#echoes.admit(to, topic, payload)) return;
    relayMessage(target, to, topic, payload, this.#log);
  }

  /**
   * Subscribes `source` again to the topics relayed from it, so that its
   * broker sends their retained messages again and they are copied. Called
   * when the other broker lost the depot's session, because it may then
   * have lost the retained copies too.
   */
  copyAgainFrom(source: MqttClient | undefined, from: DepotSide): void {
    if (source === undefined) return;
    const to = from === 'upstream' ? 'downstream' : 'upstream';
    this.#echoes.clear(to);
    const filters =
      from === 'upstream'
        ? downstreamRelayFilters(this.#topics)
        : upstreamRelayFilters(this.#topics);
    this.#log.info({ side: from, filters }, 'copying retained messages again');
    subscribe(source, filters).catch((err: unknown) => {
      this.#log.warn({ err, side: from, filters }, 'subscription failed');
    });
  }
}
