/**
 * MQTT topic names. Every topic starts with `fleet/v1/<fleetId>` so that a
 * new protocol version can run beside this one on the same broker.
 */

const TOPIC_VERSION = 'v1';

/** Checks that an id can be one MQTT topic level. */
export function assertTopicLevel(kind: string, value: string): void {
  if (value.length === 0 || value.length > 128 || /[/#+\u0000]/.test(value)) {
    throw new RangeError(
      `invalid ${kind} ${JSON.stringify(value)}: expected 1-128 characters ` +
        'without "/", "#", "+" or NUL',
    );
  }
}

/** Topic names of one fleet. */
export class FleetTopics {
  readonly fleetId: string;
  readonly prefix: string;

  constructor(fleetId: string) {
    assertTopicLevel('fleet id', fleetId);
    this.fleetId = fleetId;
    this.prefix = `fleet/${TOPIC_VERSION}/${fleetId}`;
  }

  /** Retained RoundTask of the current round. */
  roundTask(): string {
    return `${this.prefix}/rounds/current`;
  }

  /** Retained ModelRelease of the current global model. */
  release(): string {
    return `${this.prefix}/releases/current`;
  }

  /** ModelUpdate from one vehicle, QoS 1. */
  update(vehicleId: string): string {
    assertTopicLevel('vehicle id', vehicleId);
    return `${this.prefix}/vehicles/${vehicleId}/updates`;
  }

  /** UpdateAck to one vehicle, QoS 1. */
  ack(vehicleId: string): string {
    assertTopicLevel('vehicle id', vehicleId);
    return `${this.prefix}/vehicles/${vehicleId}/ack`;
  }

  /** Retained VehicleStatus of one vehicle, also its last will. */
  status(vehicleId: string): string {
    assertTopicLevel('vehicle id', vehicleId);
    return `${this.prefix}/vehicles/${vehicleId}/status`;
  }

  /** Subscription filter for every vehicle's updates. */
  allUpdates(): string {
    return `${this.prefix}/vehicles/+/updates`;
  }

  /** Subscription filter for every vehicle's status. */
  allStatus(): string {
    return `${this.prefix}/vehicles/+/status`;
  }

  /**
   * Returns the vehicle id of a per-vehicle topic of this fleet, or
   * undefined when the topic is not one.
   */
  vehicleIdOf(topic: string): string | undefined {
    const head = `${this.prefix}/vehicles/`;
    if (!topic.startsWith(head)) return undefined;
    const rest = topic.slice(head.length).split('/');
    return rest.length === 2 && rest[0].length > 0 ? rest[0] : undefined;
  }
}
