/**
 * The delivery ledger of a simulation: every genuine update the vehicles
 * finished, every decision of the aggregator, and the checks that nothing
 * was lost or counted twice.
 */
import type { UpdateDecidedEvent } from '../../aggregator/index.ts';
import type { PayloadFaultKind } from './faults.ts';

/** Most ids listed per problem in the summary. */
const MAX_LISTED_IDS = 20;

/** Source from which the ledger learned of a genuine update. */
export type UpdateSource = 'sent' | 'resent' | 'link' | 'outbox';

/** Delivery outcome of a whole run, in the report's `delivery` object. */
export interface DeliverySummary {
  /** Genuine updates written to an outbox (seen sent, resent, on a link or left in an outbox). */
  finishedUpdates: number;
  /** Updates accepted exactly once. */
  acceptedOnce: number;
  /** Updates never accepted, each rejected with a reason code. */
  rejectedWithReason: number;
  /** Those updates by the reason code of their first rejection. */
  rejectedByReason: Record<string, number>;
  /** Finished updates without any decision of the aggregator. */
  lost: number;
  /** Lost updates still in an outbox at the end. */
  lostPending: number;
  lostUpdateIds: string[];
  /**
   * Extra acceptances: an update id accepted again, or a second accepted
   * update for one (vehicle, round).
   */
  doubleCounted: number;
  doubleCountedIds: string[];
  /**
   * Accepted updates of rounds the aggregator abandoned when it restarted.
   * They never reached a model; their vehicles train again in later rounds.
   */
  acceptedInInterruptedRounds: number;
  /** Decisions on copies of an update after its first decision. */
  repeatDecisions: number;
  /** Outbox entries left at the end, decided or not. */
  pendingAtEnd: number;
  /** Bad payloads published by the misbehaving sender. */
  injectedPayloads: number;
  injectedRejected: number;
  /** Bad payloads the aggregator accepted; any is a validation hole. */
  injectedAccepted: number;
  /** Bad payloads without a decision. */
  injectedUndecided: number;
  /** Rejections of bad payloads, by kind and reason code. */
  injectedByKind: Record<string, Record<string, number>>;
  /** Rejections of bad payloads whose code was not the expected one. */
  injectedUnexpectedCode: number;
  /** Decisions on update ids that are neither genuine nor injected. */
  unattributedDecisions: number;
  /** Interrupted round numbers. */
  interruptedRounds: number[];
  /**
   * Selected vehicles that finished no update for a round, as
   * `<vehicle>@<round>`; interrupted rounds are left out. A vehicle that
   * shows up here round after round has stopped taking round tasks.
   */
  silentVehicleRounds: string[];
}

interface GenuineUpdate {
  vehicleId: string;
  round: number;
  sources: Set<UpdateSource>;
}

interface InjectedPayload {
  kind: PayloadFaultKind;
  vehicleId: string;
  updateId: string | undefined;
  expectedCode: string;
  decision: UpdateDecidedEvent | undefined;
}

/** Records updates and decisions; `summarize()` checks them. */
export class DeliveryLedger {
  readonly #genuine = new Map<string, GenuineUpdate>();
  readonly #decisions: UpdateDecidedEvent[] = [];
  readonly #injected: InjectedPayload[] = [];
  readonly #injectedById = new Map<string, InjectedPayload>();
  readonly #interruptedRounds = new Set<number>();
  readonly #secureInputs = new Set<string>();
  readonly #selectedByRound = new Map<number, readonly string[]>();
  /** Decisions without an update id that match no bad payload. */
  #unmatchedUndecodable = 0;

  /** Notes a genuine update of `vehicleId` for `round`. */
  noteFinished(
    updateId: string,
    vehicleId: string,
    round: number,
    source: UpdateSource,
  ): void {
    const known = this.#genuine.get(updateId);
    if (known !== undefined) {
      known.sources.add(source);
      return;
    }
    this.#genuine.set(updateId, {
      vehicleId,
      round,
      sources: new Set([source]),
    });
  }

  /** True once the update id was noted as genuine. */
  isKnown(updateId: string): boolean {
    return this.#genuine.has(updateId);
  }

  /**
   * Notes a bad payload before it is published. Payloads that do not
   * decode are matched to decisions without an id, per vehicle, in order.
   */
  noteInjected(payload: {
    kind: PayloadFaultKind;
    vehicleId: string;
    updateId: string | undefined;
    expectedCode: string;
  }): void {
    const record: InjectedPayload = { ...payload, decision: undefined };
    this.#injected.push(record);
    if (payload.updateId !== undefined) {
      this.#injectedById.set(payload.updateId, record);
    }
  }

  noteDecision(event: UpdateDecidedEvent): void {
    this.#decisions.push(event);
    const injected =
      event.updateId === undefined
        ? this.#injected.find(
            (record) =>
              record.updateId === undefined &&
              record.decision === undefined &&
              record.vehicleId === event.vehicleId,
          )
        : this.#injectedById.get(event.updateId);
    if (injected !== undefined && injected.decision === undefined) {
      injected.decision = event;
    } else if (event.updateId === undefined) {
      this.#unmatchedUndecodable += 1;
    }
  }

  /** Notes the vehicles selected for `round`. */
  noteRoundOpened(round: number, selected: readonly string[]): void {
    this.#selectedByRound.set(round, [...selected]);
  }

  /** Marks `round` as abandoned by an aggregator restart. */
  noteInterruptedRound(round: number): void {
    this.#interruptedRounds.add(round);
  }

  /**
   * Checks every finished update against the decisions. `pendingIds` are
   * the update ids still in an outbox at the end.
   */
  summarize(pendingIds: ReadonlySet<string>): DeliverySummary {
    const byId = this.#decisionsByUpdateId();
    const summary = this.#emptySummary(pendingIds.size);
    for (const updateId of this.#genuine.keys()) {
      const decisions = byId.get(updateId) ?? [];
      this.#classify(summary, updateId, decisions, pendingIds);
    }
    this.#checkVehicleRounds(summary);
    for (const event of this.#decisions) {
      if (event.accepted && this.#interruptedRounds.has(event.round ?? -1)) {
        summary.acceptedInInterruptedRounds += 1;
      }
    }
    this.#summarizeInjected(summary);
    summary.silentVehicleRounds = this.#silentVehicleRounds();
    summary.lostUpdateIds = summary.lostUpdateIds.slice(0, MAX_LISTED_IDS);
    summary.doubleCountedIds = summary.doubleCountedIds.slice(
      0,
      MAX_LISTED_IDS,
    );
    return summary;
  }

  #emptySummary(pendingAtEnd: number): DeliverySummary {
    return {
      finishedUpdates: this.#genuine.size,
      acceptedOnce: 0,
      rejectedWithReason: 0,
      rejectedByReason: {},
      lost: 0,
      lostPending: 0,
      lostUpdateIds: [],
      doubleCounted: 0,
      doubleCountedIds: [],
      acceptedInInterruptedRounds: 0,
      repeatDecisions: 0,
      pendingAtEnd,
      injectedPayloads: this.#injected.length,
      injectedRejected: 0,
      injectedAccepted: 0,
      injectedUndecided: 0,
      injectedByKind: {},
      injectedUnexpectedCode: 0,
      unattributedDecisions: 0,
      interruptedRounds: [...this.#interruptedRounds].sort((a, b) => a - b),
      silentVehicleRounds: [],
    };
  }

  /**
   * Notes a vehicle's input to a secure round. It travels as a masked
   * input, not as an outbox entry, so it counts only against silence.
   */
  noteSecureInput(vehicleId: string, round: number): void {
    this.#secureInputs.add(`${vehicleId}@${round}`);
  }

  #silentVehicleRounds(): string[] {
    const finished = new Set<string>(this.#secureInputs);
    for (const update of this.#genuine.values()) {
      finished.add(`${update.vehicleId}@${update.round}`);
    }
    const silent: string[] = [];
    for (const [round, selected] of this.#selectedByRound) {
      if (this.#interruptedRounds.has(round)) continue;
      for (const vehicleId of selected) {
        const key = `${vehicleId}@${round}`;
        if (!finished.has(key)) silent.push(key);
      }
    }
    return silent;
  }

  #decisionsByUpdateId(): Map<string, UpdateDecidedEvent[]> {
    const byId = new Map<string, UpdateDecidedEvent[]>();
    for (const event of this.#decisions) {
      if (event.updateId === undefined) continue;
      const list = byId.get(event.updateId) ?? [];
      list.push(event);
      byId.set(event.updateId, list);
    }
    return byId;
  }

  #classify(
    summary: DeliverySummary,
    updateId: string,
    decisions: UpdateDecidedEvent[],
    pendingIds: ReadonlySet<string>,
  ): void {
    if (decisions.length === 0) {
      summary.lost += 1;
      if (pendingIds.has(updateId)) summary.lostPending += 1;
      summary.lostUpdateIds.push(updateId);
      return;
    }
    summary.repeatDecisions += decisions.length - 1;
    const acceptances = decisions.filter((event) => event.accepted).length;
    if (acceptances === 1) {
      summary.acceptedOnce += 1;
    } else if (acceptances > 1) {
      summary.doubleCounted += acceptances - 1;
      summary.doubleCountedIds.push(updateId);
    } else {
      const code = decisions[0].reasonCode ?? 'UNSPECIFIED';
      summary.rejectedWithReason += 1;
      summary.rejectedByReason[code] =
        (summary.rejectedByReason[code] ?? 0) + 1;
    }
  }

  /** Counts (vehicle, round) pairs with more than one accepted update id. */
  #checkVehicleRounds(summary: DeliverySummary): void {
    const acceptedIds = new Map<string, Set<string>>();
    for (const event of this.#decisions) {
      if (!event.accepted) continue;
      const key = `${event.vehicleId}@${event.round}`;
      const ids = acceptedIds.get(key) ?? new Set<string>();
      ids.add(event.updateId ?? '');
      acceptedIds.set(key, ids);
    }
    for (const [key, ids] of acceptedIds) {
      if (ids.size <= 1) continue;
      summary.doubleCounted += ids.size - 1;
      summary.doubleCountedIds.push(key);
    }
  }

  #summarizeInjected(summary: DeliverySummary): void {
    for (const record of this.#injected) {
      const perKind = (summary.injectedByKind[record.kind] ??= {});
      const event = record.decision;
      if (event === undefined) {
        summary.injectedUndecided += 1;
        perKind.UNDECIDED = (perKind.UNDECIDED ?? 0) + 1;
      } else if (event.accepted) {
        summary.injectedAccepted += 1;
        perKind.ACCEPTED = (perKind.ACCEPTED ?? 0) + 1;
      } else {
        const code = event.reasonCode ?? 'UNSPECIFIED';
        summary.injectedRejected += 1;
        perKind[code] = (perKind[code] ?? 0) + 1;
        if (code !== record.expectedCode) summary.injectedUnexpectedCode += 1;
      }
    }
    summary.unattributedDecisions = this.#unmatchedUndecodable;
    for (const event of this.#decisions) {
      const id = event.updateId;
      if (id === undefined) continue;
      if (!this.#genuine.has(id) && !this.#injectedById.has(id)) {
        summary.unattributedDecisions += 1;
      }
    }
  }
}

/**
 * Formats the delivery counts as one console line. Interrupted rounds and
 * bad payloads appear only when the run had them.
 */
export function formatDeliveryLine(summary: DeliverySummary): string {
  const reasons = Object.entries(summary.rejectedByReason)
    .map(([code, count]) => `${code} ${count}`)
    .join(', ');
  const parts = [
    `delivery: ${summary.finishedUpdates} finished updates`,
    `${summary.acceptedOnce} accepted once`,
    `${summary.rejectedWithReason} rejected with a reason` +
      (reasons === '' ? '' : ` (${reasons})`),
    `lost ${summary.lost}`,
    `double counted ${summary.doubleCounted}`,
  ];
  if (summary.interruptedRounds.length > 0) {
    parts.push(
      `accepted in interrupted rounds ${summary.acceptedInInterruptedRounds}`,
    );
  }
  if (summary.injectedPayloads > 0) {
    parts.push(
      `bad payloads rejected ${summary.injectedRejected} of ` +
        `${summary.injectedPayloads}, accepted ${summary.injectedAccepted}`,
    );
  }
  if (summary.silentVehicleRounds.length > 0) {
    parts.push(
      `selected vehicles silent in a round ` +
        `${summary.silentVehicleRounds.length}`,
    );
  }
  if (summary.pendingAtEnd > 0) {
    parts.push(`left in outboxes ${summary.pendingAtEnd}`);
  }
  return parts.join(', ');
}
