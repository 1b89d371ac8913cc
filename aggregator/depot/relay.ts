/**
 * Rules for the messages the depot copies between the fleet broker and
 * the depot broker, and the copying itself. The round task and everything
 * under `releases/` (notices, candidate notices, chunks) go down, and the
 * vehicles' statuses and reports go up. Payloads are copied unchanged, so
 * signed release notices stay verifiable on the vehicles.
 */
import type { MqttClient } from 'mqtt';
import type { FleetTopics, Logger } from '../../protocol/index.ts';
import type { DepotSide } from './connection.ts';

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
 * retained. The flag of the received message does not show it, because an MQTT
 * 3.1.1 broker clears it on a message it forwards to an existing
 * subscription (conformance rule MQTT-3.3.1-9). An empty payload stays
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
