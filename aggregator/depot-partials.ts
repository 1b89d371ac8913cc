/**
 * Fleet side of hierarchical aggregation. DepotPartials decides on each
 * depot's PartialAggregate, counts an accepted one in the open round,
 * logs the decision and acks it. The ack is an UpdateAck whose update id
 * is the partial id, sent on the depot's ack topic.
 *
 * A partial is checked like the vehicle updates it merged: every entry
 * goes through the header checks of validate.ts (round, selection, model
 * version, duplicates, example count), and its mean delta through the
 * same tensor checks, in float32 only.
 */
import {
  ErrorCode,
  decodePartialAggregate,
  encodeUpdateAck,
  isFleetError,
  type FleetTopics,
  type Logger,
  type PartialAggregate,
} from '../protocol/index.ts';
import { NO_COMPRESSION } from '../protocol/compression/index.ts';
import type { WeightMap } from '../models/architecture.ts';
import { MAX_ABS_WEIGHTED_DELTA, MAX_EXAMPLES_PER_ADD } from './fedavg.ts';
import { roundContextOf, type IngressState } from './ingress.ts';
import { buildAck, truncateText } from './messages.ts';
import { decodeDeltaTensors } from './delta-tensors.ts';
import type { OpenRound } from './round.ts';
import {
  checkUpdateHeader,
  type RejectedUpdate,
  type RoundContext,
} from './validate.ts';

/** Maximum length of an id copied into a log line. */
const MAX_LOGGED_ID_CHARS = 130;

/** State a partial is judged against. */
export interface PartialContext extends RoundContext {
  /** Depot ids of the option `depots`. */
  depots: ReadonlySet<string>;
  /**
   * Update ids of the partial the open round counted under this key (see
   * partialKeyOf), or undefined.
   */
  countedPartial(key: string): readonly string[] | undefined;
}

/** A partial that passed every check, or a copy of a counted one. */
export interface AcceptedPartial {
  accepted: true;
  partial: PartialAggregate;
  /** Decoded mean delta, or undefined for a copy of a counted partial. */
  meanDeltas: WeightMap | undefined;
}

/** A partial that failed a check; `partial` is set once it decoded. */
export interface RejectedPartial {
  accepted: false;
  code: ErrorCode;
  reason: string;
  partial?: PartialAggregate;
}

export type PartialDecision = AcceptedPartial | RejectedPartial;

/**
 * Returns the key of a partial in OpenRound. Depot ids are one topic
 * level, so the first "/" ends the depot id and two keys cannot collide.
 */
export function partialKeyOf(
  partial: Pick<PartialAggregate, 'depotId' | 'partialId'>,
): string {
  return `${partial.depotId}/${partial.partialId}`;
}

function reject(
  code: ErrorCode,
  reason: string,
  partial?: PartialAggregate,
): RejectedPartial {
  return { accepted: false, code, reason, partial };
}

/**
 * Decides whether `payload`, received on the partial topic of
 * `topicDepotId`, counts in the open round. Checks run in a fixed order
 * (size, depot, decoding, sender, copy of a counted partial, entries,
 * total examples, tensors) and the first failure decides the code.
 */
export function decidePartial(
  topicDepotId: string,
  payload: Uint8Array,
  context: PartialContext,
): PartialDecision {
  if (payload.byteLength > context.maxMessageBytes) {
    return reject(
      ErrorCode.PayloadTooLarge,
      `partial is ${payload.byteLength} bytes, above the maximum of ` +
        `${context.maxMessageBytes} bytes`,
    );
  }
  if (!context.depots.has(topicDepotId)) {
    return reject(
      ErrorCode.InvalidConfig,
      `depot ${topicDepotId} is not one of the fleet aggregator's ` +
        `${context.depots.size} depots; add it to the aggregator's --depots`,
    );
  }
  let partial: PartialAggregate;
  try {
    partial = decodePartialAggregate(payload);
  } catch (err) {
    if (!isFleetError(err)) throw err;
    return reject(err.code, err.message);
  }
  if (partial.depotId !== topicDepotId) {
    return reject(
      ErrorCode.MalformedPayload,
      `partial ${partial.partialId} names depot ${partial.depotId} but ` +
        `arrived on the partial topic of depot ${topicDepotId}`,
      partial,
    );
  }

  const counted =
    context.openRound === partial.round
      ? context.countedPartial(partialKeyOf(partial))
      : undefined;
  if (counted !== undefined) return decideCopy(partial, counted);
  const problem =
    checkEntries(partial, context) ?? checkTotal(partial, context);
  if (problem !== undefined) return { ...problem, partial };

  const meanDeltas = decodeDeltaTensors(partial.meanDeltas, 'meanDeltas', {
    round: partial.round,
    trainableShapes: context.trainableShapes,
    // The FedAvg sums weight each value by the partial's numExamples,
    // so the kernel's bound on the product may be the tighter one.
    maxAbsDeltaValue: Math.min(
      context.maxAbsDeltaValue,
      MAX_ABS_WEIGHTED_DELTA / partial.numExamples,
    ),
    // The depot decodes its vehicles' updates before merging them.
    updateCompression: NO_COMPRESSION,
  });
  if (!(meanDeltas instanceof Map)) {
    return { ...meanDeltas, reason: describe(partial, meanDeltas.reason) };
  }
  return { accepted: true, partial, meanDeltas };
}

/**
 * Accepts again a copy of a counted partial, whose first ack may have been
 * lost, without counting it twice. The same id for other updates is
 * rejected, since acking it would drop those updates unseen.
 */
function decideCopy(
  partial: PartialAggregate,
  countedUpdateIds: readonly string[],
): PartialDecision {
  const updateIds = partial.updates.map((entry) => entry.updateId);
  const isSame =
    updateIds.length === countedUpdateIds.length &&
    updateIds.every((id, index) => id === countedUpdateIds[index]);
  if (isSame) return { accepted: true, partial, meanDeltas: undefined };
  return reject(
    ErrorCode.DuplicateUpdate,
    describe(
      partial,
      `round ${partial.round} counted a partial with this id for updates ` +
        `[${countedUpdateIds.join(', ')}], not [${updateIds.join(', ')}]; ` +
        'expected a new partial id for another set of updates',
    ),
    partial,
  );
}

function describe(partial: PartialAggregate, reason: string): string {
  return `partial ${partial.partialId} from depot ${partial.depotId}: ${reason}`;
}

/**
 * Checks each entry as the header of a vehicle update of the partial's
 * round and model, and that no update id appears twice.
 */
function checkEntries(
  partial: PartialAggregate,
  context: RoundContext,
): RejectedPartial | undefined {
  const updateIds = new Set<string>();
  for (const entry of partial.updates) {
    const header = {
      ...entry,
      round: partial.round,
      modelName: partial.modelName,
      baseModelVersion: partial.baseModelVersion,
    };
    const problem: RejectedUpdate | undefined =
      checkUpdateHeader(header, context) ??
      (updateIds.has(entry.updateId)
        ? {
            accepted: false,
            code: ErrorCode.DuplicateUpdate,
            reason: `update ${entry.updateId} appears in two entries`,
          }
        : undefined);
    if (problem !== undefined) {
      const reason = `entry of vehicle ${entry.vehicleId}: ${problem.reason}`;
      return reject(problem.code, describe(partial, reason));
    }
    updateIds.add(entry.updateId);
  }
  return undefined;
}

/** Checks that the partial's weight fits the FedAvg sums exactly. */
function checkTotal(
  partial: PartialAggregate,
  context: RoundContext,
): RejectedPartial | undefined {
  const { numExamples } = partial;
  if (numExamples > MAX_EXAMPLES_PER_ADD) {
    return reject(
      ErrorCode.InvalidExampleCount,
      describe(
        partial,
        `numExamples ${numExamples} is above ${MAX_EXAMPLES_PER_ADD}, the ` +
          'largest weight the FedAvg sums add exactly',
      ),
    );
  }
  if (!Number.isSafeInteger(context.acceptedExamples + numExamples)) {
    return reject(
      ErrorCode.InvalidExampleCount,
      describe(
        partial,
        `numExamples ${numExamples} would raise the round's sum of ` +
          `${context.acceptedExamples} above ${Number.MAX_SAFE_INTEGER}`,
      ),
    );
  }
  return undefined;
}

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

/** Receives the partials of the configured depots. */
export class DepotPartials {
  readonly #host: DepotPartialsHost;
  readonly #depots: ReadonlySet<string>;

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
      countedPartial: (key) => round?.countedPartial(key),
    });
    if (round?.isOpen === true) this.#count(round, payload, decision);

    this.#log(depotId, payload.byteLength, decision, state);
    const { partial } = decision;
    const ack = buildAck(
      {
        ...decision,
        update:
          partial === undefined
            ? undefined
            : { updateId: partial.partialId, round: partial.round },
      },
      {
        round: state.fleet.lastRound,
        modelVersion: state.currentModelVersion,
      },
    );
    this.#host.publishAck(ackTopic, encodeUpdateAck(ack));
    return true;
  }

  /**
   * Counts a new accepted partial, or a rejected one as one rejected
   * message. A copy of a counted partial changes nothing.
   */
  #count(round: OpenRound, payload: Uint8Array, decision: PartialDecision) {
    if (!decision.accepted) {
      round.record(payload.byteLength, decision);
      return;
    }
    const { partial, meanDeltas } = decision;
    if (meanDeltas === undefined) return;
    round.recordPartial(payload.byteLength, {
      key: partialKeyOf(partial),
      entries: partial.updates,
      numExamples: partial.numExamples,
      meanDeltas,
    });
    for (const entry of partial.updates) {
      this.#host.rememberAccepted(entry.updateId, partial.round);
    }
  }

  #log(
    depotId: string,
    bytes: number,
    decision: PartialDecision,
    state: IngressState,
  ): void {
    const partial = decision.partial;
    const fields = {
      depotId,
      partialId:
        partial === undefined
          ? undefined
          : truncateText(partial.partialId, MAX_LOGGED_ID_CHARS),
      round: partial?.round,
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
      },
      'depot partial rejected',
    );
  }
}
