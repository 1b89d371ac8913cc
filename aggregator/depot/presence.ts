/**
 * Detection of two depot aggregators that use one depot id. Both connect
 * to the fleet broker with the client id `depot-<depot id>-up`. The broker
 * closes the older connection of a client id each time the other connects
 * (MQTT 3.1.1, conformance rule MQTT-3.1.4-2). Without this check the two
 * take the connection from each other every second, and fleet acks reach
 * whichever is connected.
 *
 * Each depot instance has a random instance id. On every connection it
 * subscribes to its presence topic again, which makes the broker send the
 * retained presence, and publishes its own, retained. Its last will is an
 * offline presence stamped with the time of its latest connection loss.
 * A presence of another instance published after this one started proves
 * that the other is running. A stopped or crashed instance publishes
 * nothing stamped after the new one started, because the broker publishes
 * its earlier-stamped will at the latest when the new connection takes
 * over the client id. The instance
 * that started later stops with an error, and the other keeps running.
 */
import { randomBytes } from 'node:crypto';
import type { IClientPublishOptions, MqttClient } from 'mqtt';
import { ErrorCode, FleetError, type Logger } from '../../protocol/index.ts';

/** State a depot instance announces. */
export type PresenceState = 'online' | 'offline';

/** JSON payload on the presence topic. */
export interface PresenceMessage {
  depotId: string;
  instanceId: string;
  state: PresenceState;
  /** Start of the instance, epoch milliseconds. */
  startedAtMs: number;
  /** When the instance built this message, epoch milliseconds. */
  publishedAtMs: number;
}

/** Inputs of DepotPresence. */
export interface PresenceOptions {
  depotId: string;
  /** The depot's presence topic on the fleet broker. */
  topic: string;
  /** Client id of the upstream connection, named in the error. */
  clientId: string;
  log: Logger;
}

function parsePresence(payload: Buffer): PresenceMessage | undefined {
  let value: unknown;
  try {
    value = JSON.parse(payload.toString('utf8'));
  } catch {
    return undefined;
  }
  const message = value as Partial<PresenceMessage> | null;
  const isValid =
    typeof message?.instanceId === 'string' &&
    (message.state === 'online' || message.state === 'offline') &&
    Number.isSafeInteger(message.startedAtMs) &&
    Number.isSafeInteger(message.publishedAtMs);
  return isValid ? (message as PresenceMessage) : undefined;
}

/** Presence of one depot instance on the fleet broker. */
export class DepotPresence {
  readonly instanceId = randomBytes(8).toString('hex');
  readonly startedAtMs = Date.now();
  readonly #options: PresenceOptions;
  /** Ids of later instances already logged, so each is logged once. */
  readonly #reported = new Set<string>();

  constructor(options: PresenceOptions) {
    this.#options = options;
  }

  /**
   * Returns the last will of the upstream connection: this instance offline.
   */
  will(): IClientPublishOptions & { topic: string; payload: Buffer } {
    return {
      topic: this.#options.topic,
      payload: this.#encode('offline'),
      qos: 1,
      retain: true,
    };
  }

  /**
   * Subscribes to the presence topic and publishes this instance online
   * on every connection of `client`, and stamps its will with the time of
   * each connection loss.
   */
  attach(client: MqttClient): void {
    const { topic, log } = this.#options;
    client.on('connect', () => {
      client.subscribe(topic, { qos: 1 }, (err) => {
        if (err) log.warn({ err, topic }, 'presence subscription failed');
      });
      this.#publish(client, 'online');
    });
    client.on('close', () => {
      const will = client.options.will;
      if (will !== undefined) will.payload = this.#encode('offline');
    });
  }

  /** Publishes this instance offline, before the depot disconnects. */
  publishOffline(client: MqttClient): void {
    this.#publish(client, 'offline');
  }

  /**
   * Checks a message from the presence topic. Returns the error to stop
   * with when it shows another running instance that started first.
   * NOTE: compares the wall clocks of two hosts. A clock skew larger than
   * the gap between the other's last presence and this start misleads it.
   */
  receive(payload: Buffer): FleetError | undefined {
    const { log, depotId, clientId } = this.#options;
    const other = parsePresence(payload);
    if (other === undefined) {
      log.warn(
        { depotId, bytes: payload.length },
        'invalid depot presence ignored',
      );
      return undefined;
    }
    if (other.instanceId === this.instanceId) return undefined;
    if (other.publishedAtMs < this.startedAtMs) {
      log.debug(
        { otherInstanceId: other.instanceId, state: other.state },
        'presence of an earlier depot instance',
      );
      return undefined;
    }
    const isOtherFirst =
      other.startedAtMs < this.startedAtMs ||
      (other.startedAtMs === this.startedAtMs &&
        other.instanceId < this.instanceId);
    if (isOtherFirst) {
      return new FleetError(
        ErrorCode.InvalidConfig,
        `depot id ${depotId} is in use by another running depot aggregator ` +
          `(instance ${other.instanceId}, started ` +
          `${new Date(other.startedAtMs).toISOString()}): both connect to ` +
          `the fleet broker as ${clientId} and take the connection from ` +
          'each other. Stop one of them, or give this one another ' +
          '--depot-id',
      );
    }
    if (!this.#reported.has(other.instanceId)) {
      this.#reported.add(other.instanceId);
      log.error(
        {
          instanceId: this.instanceId,
          otherInstanceId: other.instanceId,
          otherStartedAtMs: other.startedAtMs,
        },
        'another depot aggregator uses this depot id, the later one stops',
      );
    }
    return undefined;
  }

  #publish(client: MqttClient, state: PresenceState): void {
    const { topic, log } = this.#options;
    const options = { qos: 1 as const, retain: true };
    client.publish(topic, this.#encode(state), options, (err) => {
      if (err) log.warn({ err, topic, state }, 'presence publish failed');
    });
  }

  #encode(state: PresenceState): Buffer {
    const message: PresenceMessage = {
      depotId: this.#options.depotId,
      instanceId: this.instanceId,
      state,
      startedAtMs: this.startedAtMs,
      publishedAtMs: Date.now(),
    };
    return Buffer.from(JSON.stringify(message));
  }
}
