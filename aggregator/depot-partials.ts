/**
 * Fleet side of hierarchical aggregation. DepotPartials decides on each
 * depot's PartialAggregate (see validate-partial.ts), counts an accepted
 * one in the open round, logs the decision and acks it. The ack is an
 * UpdateAck whose update id is the partial id, sent on the depot's ack
 * topic, so that the depot can match it to the partial it waits for.
 */
import {
  encodeUpdateAck,
  type FleetTopics,
  type Logger,
  type UpdateAck,
} from '../protocol/index.ts';
import { roundContextOf, type IngressState } from './ingress.ts';
import { buildAck, truncateText } from './messages.ts';
import type { OpenRound } from './round.ts';
import {
  decidePartial,
  partialKeyOf,
  type CountedPartialRecord,
  type PartialDecision,
  type PartialHeader,
} from './validate-partial.ts';

/** Maximum length of an id copied into a log line. */
const MAX_LOGGED_ID_CHARS = 130;

/**
 * Counted partials remembered across rounds, so that a resend whose ack
 * was lost is acked ACCEPTED again after its round closed. Each record
 * contains the partial's key and one update id per merged vehicle. The
 * open round's own partials are found in OpenRound, however many there are.
 */
const MAX_REMEMBERED_PARTIALS = 1_000;

/** Settings and callbacks DepotPartials takes from the aggregator. */
export interface DepotPartialsHost {
  /** Depot ids of the option `depots`, at least one. */
  depots: readonly string[];
  topics: FleetTopics;
  log: Logger;
  /** Publishes an ack with QoS 1 and logs a failure. */
  publishAck(topic: string, ack: Uint8Array): void;
  /**
   * The round state a partial arriving now is judged against, or
   * undefined before the first model is loaded.
   */
  ingressState(): IngressState | undefined;
  /** Remembers an accepted update id, so a late copy is a duplicate. */
  rememberAccepted(updateId: string, round: number): void;
}

/** Returns the partial id and round of a decision, when they are known. */
function headerOf(decision: PartialDecision): PartialHeader | undefined {
  return decision.accepted ? decision.partial : decision.header;
}

/** Receives the partials of the configured depots. */
export class DepotPartials {
  readonly #host: DepotPartialsHost;
  readonly #depots: ReadonlySet<string>;
  /** Partials counted in recent rounds by key, oldest first. */
  readonly #counted = new Map<string, CountedPartialRecord>();

  constructor(host: DepotPartialsHost) {
    this.#host = host;
    this.#depots = new Set(host.depots);
  }

  /**
   * Topic filters to subscribe to with QoS 1.
   * NOTE: broker/acl.ts grants the aggregator identity no depot topics,
   * so a broker that checks identities denies this filter and no partial
   * arrives.
   */
  get subscriptions(): string[] {
    return [this.#host.topics.allDepotPartials()];
  }

  /**
   * Handles `payload` when `topic` is a depot's partial topic. It decides,
   * counts an accepted partial in the open round, logs and acks, and it
   * returns false for any other topic. Before the first model is loaded
   * the partial is dropped without an ack.
   */
  receive(topic: string, payload: Uint8Array): boolean {
    const { topics, log } = this.#host;
    const depotId = topics.depotIdOf(topic);
    if (depotId === undefined) return false;
    let ackTopic: string;
    try {
      if (topic !== topics.depotPartial(depotId)) return false;
      ackTopic = topics.depotAck(depotId);
    } catch (err) {
      log.warn({ err, topic }, 'depot partial on an invalid topic dropped');
      return true;
    }
    const state = this.#host.ingressState();
    if (state === undefined) return true;

    const round = state.round;
    const decision = decidePartial(depotId, payload, {
      ...roundContextOf(state),
      depots: this.#depots,
      countedPartial: (key) => this.#countedPartial(round, key),
    });
    if (round?.isOpen === true) {
      this.#count(round, depotId, payload.byteLength, decision);
    }

    this.#log(depotId, payload.byteLength, decision, state);
    this.#host.publishAck(ackTopic, encodeUpdateAck(ackOf(decision, state)));
    return true;
  }

  /**
   * Returns the partial counted under `key` in `round`, which may have
   * closed already, or else in one of the remembered earlier rounds.
   */
  #countedPartial(
    round: OpenRound | undefined,
    key: string,
  ): CountedPartialRecord | undefined {
    const updateIds = round?.countedPartial(key);
    if (round !== undefined && updateIds !== undefined) {
      return { round: round.round, updateIds };
    }
    return this.#counted.get(key);
  }

  /**
   * Counts a new accepted partial, or a rejected one as one rejected
   * message. A copy of a counted partial changes nothing, and neither
   * does a resend of a partial this round rejected with the same code.
   */
  #count(
    round: OpenRound,
    depotId: string,
    bytes: number,
    decision: PartialDecision,
  ): void {
    if (!decision.accepted) {
      const partialId = decision.header?.partialId;
      if (partialId === undefined) {
        round.record(bytes, decision);
        return;
      }
      const key = partialKeyOf({ depotId, partialId });
      round.recordRejectedPartial(bytes, key, decision);
      return;
    }
    const { partial, meanDeltas } = decision;
    if (meanDeltas === undefined) return;
    const key = partialKeyOf(partial);
    round.recordPartial(bytes, {
      key,
      entries: partial.updates,
      numExamples: partial.numExamples,
      meanDeltas,
    });
    this.#remember(key, {
      round: partial.round,
      updateIds: partial.updates.map((entry) => entry.updateId),
    });
    for (const entry of partial.updates) {
      this.#host.rememberAccepted(entry.updateId, partial.round);
    }
  }

  #remember(key: string, record: CountedPartialRecord): void {
    this.#counted.set(key, record);
    if (this.#counted.size > MAX_REMEMBERED_PARTIALS) {
      const oldest = this.#counted.keys().next().value as string;
      this.#counted.delete(oldest);
    }
  }

  #log(
    depotId: string,
    bytes: number,
    decision: PartialDecision,
    state: IngressState,
  ): void {
    const header = headerOf(decision);
    const partial = decision.partial;
    const fields = {
      depotId,
      partialId:
        header === undefined
          ? undefined
          : truncateText(header.partialId, MAX_LOGGED_ID_CHARS),
      round: header?.round,
      vehicles: partial?.updates.length,
      numExamples: partial?.numExamples,
      bytes,
    };
    if (decision.accepted) {
      const isCopy = decision.meanDeltas === undefined;
      this.#host.log.info(
        fields,
        isCopy ? 'depot partial accepted again' : 'depot partial accepted',
      );
      return;
    }
    this.#host.log.warn(
      {
        ...fields,
        openRound: state.round?.isOpen === true ? state.round.round : undefined,
        code: decision.code,
        reason: truncateText(decision.reason),
        duplicates: decision.duplicateUpdateIds?.length,
      },
      'depot partial rejected',
    );
  }
}

/**
 * Builds the ack of a decided partial. Its update id is the partial id
 * whenever the payload carried one, and only an unreadable payload gets
 * the placeholder id of buildAck.
 */
function ackOf(decision: PartialDecision, state: IngressState): UpdateAck {
  const header = headerOf(decision);
  const ack = buildAck(
    {
      ...decision,
      update:
        header === undefined
          ? undefined
          : { updateId: header.partialId, round: header.round },
    },
    {
      round: state.fleet.lastRound,
      modelVersion: state.currentModelVersion,
    },
  );
  const duplicateUpdateIds = decision.accepted
    ? undefined
    : decision.duplicateUpdateIds;
  return duplicateUpdateIds === undefined
    ? ack
    : { ...ack, duplicateUpdateIds };
}
