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

function assertCount(kind: string, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new RangeError(`invalid ${kind} ${value}: expected an integer >= 0`);
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

  /**
   * Retained candidate notice of a staged rollout: a signed ModelRelease
   * whose `candidate` field names the cohort that may deploy it.
   */
  candidateRelease(): string {
    return `${this.prefix}/releases/candidate`;
  }

  /**
   * Retained ReleaseChunk `index` of model `version`, for example
   * `fleet/v1/<fleet>/releases/v3/chunks/0`.
   *
   * @throws {RangeError} for a version or index that is not an integer >= 0.
   */
  releaseChunk(version: number, index: number): string {
    assertCount('model version', version);
    assertCount('chunk index', index);
    return `${this.prefix}/releases/v${version}/chunks/${index}`;
  }

  /**
   * Returns the model version and chunk index of a chunk topic of this
   * fleet, or undefined when the topic is not one.
   */
  releaseChunkOf(
    topic: string,
  ): { version: number; index: number } | undefined {
    const head = `${this.prefix}/releases/`;
    if (!topic.startsWith(head)) return undefined;
    const match = /^v(\d+)\/chunks\/(\d+)$/.exec(topic.slice(head.length));
    if (match === null) return undefined;
    const version = Number(match[1]);
    const index = Number(match[2]);
    if (!Number.isSafeInteger(version) || !Number.isSafeInteger(index)) {
      return undefined;
    }
    return { version, index };
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

  /** Retained VehicleReport of one vehicle. */
  report(vehicleId: string): string {
    assertTopicLevel('vehicle id', vehicleId);
    return `${this.prefix}/vehicles/${vehicleId}/report`;
  }

  /** Subscription filter for every vehicle's report. */
  allReports(): string {
    return `${this.prefix}/vehicles/+/report`;
  }

  /** Secure aggregation messages from one vehicle, QoS 1. */
  secureFromVehicle(vehicleId: string): string {
    assertTopicLevel('vehicle id', vehicleId);
    return `${this.prefix}/vehicles/${vehicleId}/secagg`;
  }

  /** Secure aggregation messages to one vehicle, QoS 1. */
  secureToVehicle(vehicleId: string): string {
    assertTopicLevel('vehicle id', vehicleId);
    return `${this.prefix}/vehicles/${vehicleId}/secagg-in`;
  }

  /** Subscription filter for every vehicle's secure aggregation messages. */
  allSecureFromVehicles(): string {
    return `${this.prefix}/vehicles/+/secagg`;
  }

  /** PartialAggregate from one depot aggregator, QoS 1. */
  depotPartial(depotId: string): string {
    assertTopicLevel('depot id', depotId);
    return `${this.prefix}/depots/${depotId}/partial`;
  }

  /** UpdateAck of a depot's partial, to that depot, QoS 1. */
  depotAck(depotId: string): string {
    assertTopicLevel('depot id', depotId);
    return `${this.prefix}/depots/${depotId}/ack`;
  }

  /**
   * Retained presence of the depot aggregator running as `depotId`, also
   * its last will: JSON with its instance id, state, start time and
   * publish time. A depot finds there another one that uses its id.
   */
  depotPresence(depotId: string): string {
    assertTopicLevel('depot id', depotId);
    return `${this.prefix}/depots/${depotId}/presence`;
  }

  /** Subscription filter for every depot's partials. */
  allDepotPartials(): string {
    return `${this.prefix}/depots/+/partial`;
  }

  /**
   * Returns the depot id of a depot topic of this fleet, or undefined
   * when the topic is not one.
   */
  depotIdOf(topic: string): string | undefined {
    const head = `${this.prefix}/depots/`;
    if (!topic.startsWith(head)) return undefined;
    const id = topic.slice(head.length).split('/')[0];
    return id.length > 0 ? id : undefined;
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
