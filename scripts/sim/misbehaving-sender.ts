/**
 * An MQTT client that publishes bad payloads on vehicles' update topics
 * and waits for the aggregator's decision on each one.
 */
import mqtt, { type MqttClient } from 'mqtt';
import type { UpdateDecidedEvent } from '../../aggregator/index.ts';
import type { FleetTopics, Logger } from '../../protocol/index.ts';
import type { BadPayload } from './bad-payloads.ts';

/** Outcome of one bad payload. */
export interface InjectionOutcome {
  /** False when no decision came within the timeout. */
  isDecided: boolean;
  accepted: boolean;
  reasonCode: string | undefined;
}

interface PendingInjection {
  vehicleId: string;
  updateId: string | undefined;
  resolve: (event: UpdateDecidedEvent) => void;
}

/**
 * Publishes with its own client id straight to the broker, so it never
 * shares a link or a session with the vehicle it impersonates. The
 * embedded broker has no ACLs, so any client may publish on any topic.
 */
export class MisbehavingSender {
  readonly #brokerUrl: string;
  readonly #topics: FleetTopics;
  readonly #decisionTimeoutMs: number;
  readonly #log: Logger;
  readonly #pending: PendingInjection[] = [];
  #client: MqttClient | undefined;

  constructor(options: {
    brokerUrl: string;
    topics: FleetTopics;
    /** Time to wait for the aggregator's decision on one payload. */
    decisionTimeoutMs: number;
    log: Logger;
  }) {
    this.#brokerUrl = options.brokerUrl;
    this.#topics = options.topics;
    this.#decisionTimeoutMs = options.decisionTimeoutMs;
    this.#log = options.log;
  }

  async start(): Promise<void> {
    this.#client = await mqtt.connectAsync(this.#brokerUrl, {
      protocolVersion: 4,
      clientId: 'sim-misbehaving-sender',
      clean: true,
      reconnectPeriod: 1000,
    });
    this.#client.on('error', (err) =>
      this.#log.debug({ err }, 'misbehaving sender client error'),
    );
  }

  /**
   * Matches an aggregator decision to a pending payload of the same
   * vehicle: by update id, or as the oldest pending payload that does
   * not decode when the decision has no id.
   */
  observe(event: UpdateDecidedEvent): void {
    const index = this.#pending.findIndex(
      (pending) =>
        pending.vehicleId === event.vehicleId &&
        pending.updateId === event.updateId,
    );
    if (index < 0) return;
    const [pending] = this.#pending.splice(index, 1);
    pending.resolve(event);
  }

  /**
   * Publishes `bad` on the update topic of `vehicleId` with QoS 1 and
   * resolves once the aggregator has decided on it, or after the timeout.
   */
  async send(vehicleId: string, bad: BadPayload): Promise<InjectionOutcome> {
    const client = this.#client;
    if (client === undefined) throw new Error('misbehaving sender not started');
    let timer: NodeJS.Timeout | undefined;
    const decided = new Promise<UpdateDecidedEvent | undefined>((resolve) => {
      const pending: PendingInjection = {
        vehicleId,
        updateId: bad.updateId,
        resolve,
      };
      this.#pending.push(pending);
      timer = setTimeout(() => {
        const index = this.#pending.indexOf(pending);
        if (index >= 0) this.#pending.splice(index, 1);
        resolve(undefined);
      }, this.#decisionTimeoutMs);
    });

    try {
      await client.publishAsync(
        this.#topics.update(vehicleId),
        Buffer.from(bad.payload),
        { qos: 1 },
      );
    } catch (err) {
      this.#log.warn(
        { err, vehicleId, kind: bad.kind },
        'bad payload not published',
      );
    }
    const event = await decided;
    clearTimeout(timer);
    if (event === undefined) {
      this.#log.warn(
        { vehicleId, kind: bad.kind, timeoutMs: this.#decisionTimeoutMs },
        'no decision on bad payload in time',
      );
      return { isDecided: false, accepted: false, reasonCode: undefined };
    }
    return {
      isDecided: true,
      accepted: event.accepted,
      reasonCode: event.reasonCode,
    };
  }

  async stop(): Promise<void> {
    await this.#client?.endAsync(true);
    this.#client = undefined;
  }
}
