/**
 * Topic access rules per fleet identity, as pure functions on MQTT topic
 * names and filters.
 */
import { FleetTopics, type FleetIdentity } from '../protocol/index.ts';

/** Topic filters an identity may publish to and subscribe within. */
export interface TopicRules {
  /** A PUBLISH topic must match one of these filters. */
  publish: string[];
  /**
   * A SUBSCRIBE filter must match only topics that one of these filters
   * matches, so `releases/#` allows `releases/current` and
   * `releases/v3/chunks/+` but not `+/current`.
   */
  subscribe: string[];
}

/**
 * Returns the rules of an identity. A vehicle publishes its own updates,
 * status (also its last will), inference reports and secure aggregation
 * messages. It subscribes to the round task, the release subtree, its own
 * acks and its own secure aggregation inbox.
 *
 * The aggregator publishes round tasks, releases, and every vehicle's
 * acks and secure aggregation inbox. It subscribes to every vehicle's
 * updates, status, reports and secure aggregation messages, and to its
 * own round and release topics, so that it can read back what it
 * retained.
 */
export function topicRulesOf(identity: FleetIdentity): TopicRules {
  const topics = new FleetTopics(identity.fleetId);
  const releases = `${topics.prefix}/releases/#`;
  if (identity.role === 'vehicle') {
    const vehicleId = identity.vehicleId!;
    return {
      publish: [
        topics.update(vehicleId),
        topics.status(vehicleId),
        topics.report(vehicleId),
        topics.secureFromVehicle(vehicleId),
      ],
      subscribe: [
        topics.roundTask(),
        releases,
        topics.ack(vehicleId),
        topics.secureToVehicle(vehicleId),
      ],
    };
  }
  return {
    publish: [
      topics.roundTask(),
      releases,
      `${topics.prefix}/vehicles/+/ack`,
      `${topics.prefix}/vehicles/+/secagg-in`,
    ],
    subscribe: [
      topics.allUpdates(),
      topics.allStatus(),
      topics.allReports(),
      topics.allSecureFromVehicles(),
      topics.roundTask(),
      releases,
    ],
  };
}

/**
 * True when `filter` matches `topic` under MQTT 3.1.1 rules: "+" is one
 * level, a trailing "#" is the parent level and everything below it, and
 * wildcards at the first level do not match topics starting with "$"
 * (MQTT-4.7.2-1).
 */
export function filterMatchesTopic(filter: string, topic: string): boolean {
  if (topic.startsWith('$') && /^[+#]/.test(filter)) return false;
  const filterLevels = filter.split('/');
  const topicLevels = topic.split('/');
  for (let i = 0; i < filterLevels.length; i++) {
    const level = filterLevels[i];
    if (level === '#') return i === filterLevels.length - 1;
    if (i >= topicLevels.length) return false;
    if (level !== '+' && level !== topicLevels[i]) return false;
  }
  return filterLevels.length === topicLevels.length;
}

/**
 * True when every topic that `inner` matches is also matched by `outer`,
 * for two MQTT topic filters. `fleet/#` covers `fleet/a/+`; `fleet/+`
 * does not cover `fleet/#`.
 */
export function filterCoversFilter(outer: string, inner: string): boolean {
  const outerLevels = outer.split('/');
  const innerLevels = inner.split('/');
  for (let i = 0; i < outerLevels.length; i++) {
    const level = outerLevels[i];
    if (level === '#') return i === outerLevels.length - 1;
    if (i >= innerLevels.length) return false;
    const innerLevel = innerLevels[i];
    if (innerLevel === '#') return false;
    if (level === '+') continue;
    if (innerLevel === '+' || innerLevel !== level) return false;
  }
  // A trailing "#" in `inner` also matches its parent level, which
  // `outer` (with no "#" of its own) matches only as an exact topic.
  return outerLevels.length === innerLevels.length;
}

/** True when `rules` allow publishing to `topic`. */
export function isPublishAllowed(rules: TopicRules, topic: string): boolean {
  return rules.publish.some((filter) => filterMatchesTopic(filter, topic));
}

/**
 * True when `rules` allow subscribing to `filter`. Filters starting with
 * "$" (for example `$SYS/#` or shared subscriptions) are never allowed.
 */
export function isSubscribeAllowed(rules: TopicRules, filter: string): boolean {
  if (filter.startsWith('$')) return false;
  return rules.subscribe.some((allowed) => filterCoversFilter(allowed, filter));
}
