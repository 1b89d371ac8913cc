/**
 * Executes a FaultPlan on the simulated fleet. Every vehicle and the
 * aggregator reach the broker through their own FaultyLink. The injector
 * plans each round when it opens, kills and restarts agents and the
 * aggregator, publishes bad payloads, and counts what it did;
 * VehicleLinkFaults decides per packet.
 */
import { setTimeout as delay } from 'node:timers/promises';
import type {
  Aggregator,
  RoundOpenedEvent,
  UpdateDecidedEvent,
} from '../../aggregator/index.ts';
import type { FleetTopics, Logger } from '../../protocol/index.ts';
import type { VehicleAgent } from '../../vehicle-agent/index.ts';
import type { AgentPool } from './agent-pool.ts';
import type { AggregatorHost, AggregatorRestart } from './aggregator-host.ts';
import { buildBadPayload } from './bad-payloads.ts';
import type { FaultKind, FaultPlan, RoundFaultPlan } from './faults.ts';
import { FaultyLink } from './faulty-link.ts';
import type { DeliveryLedger } from './ledger.ts';
import { MisbehavingSender } from './misbehaving-sender.ts';
import { waitUntil } from './timing.ts';
import {
  VehicleLinkFaults,
  type LinkFaultContext,
} from './vehicle-link-faults.ts';

/** Time to wait for the aggregator's decision on one bad payload. */
const BAD_PAYLOAD_DECISION_TIMEOUT_MS = 5000;
/** Pause between an aggregator crash and the start of its successor. */
const AGGREGATOR_RESTART_PAUSE_MS = 1000;
/** Time a killed agent gets to notice its cut link before it is stopped. */
const KILL_NOTICE_TIMEOUT_MS = 1000;

/** Parts of the fleet the injector acts on, known once they exist. */
export interface FleetHandles {
  agents: AgentPool;
  aggregators: AggregatorHost;
  /** Called when a restart abandons `round` at `modelVersion`. */
  onRoundInterrupted: (round: number, modelVersion: number) => void;
}

/** Fault counts and restarts of a run, for the report. */
export interface FaultRecord {
  kinds: readonly FaultKind[];
  rate: number;
  /** Faults that struck, by kind, over the whole run. */
  injected: Record<string, number>;
  /**
   * Genuine updates whose first decision came after that of an update of
   * the same round that completed later: evidence of reordering.
   */
  overtakenUpdates: number;
  restarts: AggregatorRestart[];
}

export class FaultInjector {
  readonly #plan: FaultPlan;
  readonly #topics: FleetTopics;
  readonly #brokerPort: number;
  readonly #ledger: DeliveryLedger;
  readonly #log: Logger;
  readonly #links = new Map<string, FaultyLink>();
  readonly #aggregatorLinks: FaultyLink[] = [];
  readonly #sender: MisbehavingSender;
  readonly #rules: VehicleLinkFaults;
  readonly #rounds = new Map<number, RoundFaultPlan>();
  readonly #deadlines = new Map<number, number>();
  readonly #injected = new Map<number, Record<string, number>>();
  /** Update ids seen on a link, with their completion order. */
  readonly #completionOrder = new Map<string, number>();
  /** Update ids with a decision already. */
  readonly #decidedIds = new Set<string>();
  /** Per round, the highest completion order decided so far. */
  readonly #latestDecided = new Map<number, number>();
  readonly #work = new Set<Promise<unknown>>();
  readonly #restarts: AggregatorRestart[] = [];
  readonly #holdsReleased = new AbortController();
  #fleet: FleetHandles | undefined;
  #restart: { round: number; threshold: number; accepted: number } | undefined;
  #isRestartDone = false;
  #isFinished = false;
  #overtaken = 0;

  constructor(init: {
    plan: FaultPlan;
    topics: FleetTopics;
    brokerPort: number;
    vehicleIds: readonly string[];
    ledger: DeliveryLedger;
    log: Logger;
  }) {
    this.#plan = init.plan;
    this.#topics = init.topics;
    this.#brokerPort = init.brokerPort;
    this.#ledger = init.ledger;
    this.#log = init.log;
    this.#rules = new VehicleLinkFaults(this.#linkFaultContext());
    for (const vehicleId of init.vehicleIds) {
      this.#links.set(vehicleId, this.#createLink(vehicleId, true));
    }
    // The second link is for the aggregator that replaces a crashed one.
    this.#aggregatorLinks.push(this.#createLink('aggregator', false));
    this.#aggregatorLinks.push(this.#createLink('aggregator-2', false));
    this.#sender = new MisbehavingSender({
      brokerUrl: `mqtt://127.0.0.1:${init.brokerPort}`,
      topics: init.topics,
      decisionTimeoutMs: BAD_PAYLOAD_DECISION_TIMEOUT_MS,
      log: init.log,
    });
  }

  /** Starts the links and the misbehaving sender. */
  async start(): Promise<void> {
    await Promise.all(this.#allLinks().map((link) => link.start()));
    await this.#sender.start();
  }

  /** Broker URL the agent of `vehicleId` connects to. */
  vehicleUrl(vehicleId: string): string {
    const link = this.#links.get(vehicleId);
    if (link === undefined) throw new RangeError(`no link for ${vehicleId}`);
    return link.url;
  }

  /** Broker URL of the first aggregator instance. */
  get aggregatorUrl(): string {
    return this.#aggregatorLinks[0].url;
  }

  bind(fleet: FleetHandles): void {
    this.#fleet = fleet;
  }

  /** True when no packet is held and no kill, restart or injection runs. */
  get isIdle(): boolean {
    return (
      this.#work.size === 0 &&
      (this.#fleet?.agents.pendingRestarts ?? 0) === 0 &&
      this.#allLinks().every((link) => link.heldPackets === 0)
    );
  }

  /** Faults injected per round, by kind. */
  get injectedByRound(): ReadonlyMap<number, Record<string, number>> {
    return this.#injected;
  }

  record(): FaultRecord {
    const injected: Record<string, number> = {};
    for (const kind of this.#plan.kinds) injected[kind] = 0;
    for (const counts of this.#injected.values()) {
      for (const [kind, count] of Object.entries(counts)) {
        injected[kind] += count;
      }
    }
    return {
      kinds: this.#plan.kinds,
      rate: this.#plan.rate,
      injected,
      overtakenUpdates: this.#overtaken,
      restarts: [...this.#restarts],
    };
  }

  attachAggregator(aggregator: Aggregator): void {
    aggregator.on('round-opened', (event) => this.#onRoundOpened(event));
    aggregator.on('update-decided', (event) => this.#onDecided(event));
  }

  attachAgent(agent: VehicleAgent): void {
    agent.on('training-started', ({ round }) =>
      this.#rules.onTrainingStarted(agent.vehicleId, round),
    );
  }

  /**
   * Stops injecting: holds are released and new updates pass untouched.
   * Resolves once kills, restarts and injections in progress are done.
   */
  async finish(): Promise<void> {
    this.#isFinished = true;
    this.#holdsReleased.abort();
    while (this.#work.size > 0) await Promise.allSettled([...this.#work]);
  }

  async close(): Promise<void> {
    await this.#sender.stop();
    await Promise.all(this.#allLinks().map((link) => link.close()));
  }

  #allLinks(): FaultyLink[] {
    return [...this.#links.values(), ...this.#aggregatorLinks];
  }

  #createLink(name: string, isVehicle: boolean): FaultyLink {
    return new FaultyLink({
      name,
      brokerPort: this.#brokerPort,
      log: this.#log,
      intercept: isVehicle
        ? (packet, direction) =>
            direction === 'to-broker'
              ? this.#rules.toBroker(name, packet)
              : this.#rules.toClient(name, packet)
        : undefined,
    });
  }

  #linkFaultContext(): LinkFaultContext {
    return {
      topics: this.#topics,
      isFinished: () => this.#isFinished,
      roundPlan: (round) => this.#rounds.get(round),
      deadlineOf: (round) => this.#deadlines.get(round),
      count: (round, kind) => this.#count(round, kind),
      noteUpdate: (updateId, vehicleId, round) => {
        this.#ledger.noteFinished(updateId, vehicleId, round, 'link');
        if (!this.#completionOrder.has(updateId)) {
          this.#completionOrder.set(updateId, this.#completionOrder.size);
        }
      },
      cut: (vehicleId) => {
        this.#links.get(vehicleId)?.cut();
        this.#log.info({ vehicleId }, 'fault: vehicle link cut');
      },
      kill: (vehicleId, round, pauseMs) =>
        this.#kill(vehicleId, round, pauseMs),
      hold: (ms) => this.#hold(ms),
      injectPayloads: (vehicleId, round, genuine, plan) =>
        this.#injectPayloads(vehicleId, round, genuine, plan),
    };
  }

  #onRoundOpened(event: RoundOpenedEvent): void {
    const plan = this.#plan.planRound(event.round, event.selected);
    this.#rounds.set(event.round, plan);
    this.#deadlines.set(event.round, event.deadlineMs);
    const restartRound = this.#plan.restartRound;
    if (restartRound === undefined || this.#isRestartDone) return;
    if (event.round < restartRound) return;
    const threshold = this.#plan.restartThreshold(event.selected.length);
    this.#restart =
      threshold === undefined
        ? undefined
        : { round: event.round, threshold, accepted: 0 };
  }

  #onDecided(event: UpdateDecidedEvent): void {
    this.#sender.observe(event);
    this.#noteArrivalOrder(event);
    const restart = this.#restart;
    if (restart === undefined || this.#isFinished) return;
    if (!event.accepted || event.round !== restart.round) return;
    restart.accepted += 1;
    if (restart.accepted < restart.threshold) return;
    this.#restart = undefined;
    this.#isRestartDone = true;
    // After the aggregator's own handling of this update has finished.
    setImmediate(() => this.#restartAggregator(restart.round));
  }

  #noteArrivalOrder(event: UpdateDecidedEvent): void {
    const { updateId, round } = event;
    if (updateId === undefined || round === undefined) return;
    const order = this.#completionOrder.get(updateId);
    if (order === undefined || this.#decidedIds.has(updateId)) return;
    this.#decidedIds.add(updateId);
    const latest = this.#latestDecided.get(round) ?? -1;
    if (order < latest) this.#overtaken += 1;
    else this.#latestDecided.set(round, order);
  }

  #restartAggregator(round: number): void {
    const fleet = this.#fleet!;
    const [crashed, replacement] = this.#aggregatorLinks;
    const modelVersion = fleet.aggregators.current.currentModelVersion;
    this.#count(round, 'restart-aggregator');
    this.#ledger.noteInterruptedRound(round);
    fleet.onRoundInterrupted(round, modelVersion);
    this.#log.info({ round }, 'fault: aggregator crashes');
    const restarted = fleet.aggregators
      .restart(replacement.url, AGGREGATOR_RESTART_PAUSE_MS, () => {
        crashed.setBlocked(true);
        crashed.cut();
      })
      .then((restart) => this.#restarts.push(restart));
    this.#track(restarted, 'aggregator restart failed');
  }

  /**
   * Cuts the agent's link, so it cannot publish its OFFLINE status, then
   * has the pool stop it and start a successor on the same state directory.
   */
  #kill(vehicleId: string, round: number, pauseMs: number): void {
    const fleet = this.#fleet!;
    const agent = fleet.agents.agentOf(vehicleId);
    this.#count(round, 'kill-agent');
    this.#log.info({ vehicleId, round, pauseMs }, 'fault: agent killed');
    this.#links.get(vehicleId)?.cut();
    const killed = (async () => {
      const isDisconnected = () => agent?.connected !== true;
      await waitUntil(isDisconnected, KILL_NOTICE_TIMEOUT_MS, 10);
      await fleet.agents.kill(vehicleId, pauseMs);
    })();
    this.#track(killed, 'agent kill failed');
  }

  async #injectPayloads(
    vehicleId: string,
    round: number,
    genuine: Buffer,
    plan: RoundFaultPlan,
  ): Promise<void> {
    for (const fault of plan.payloadFaults.get(vehicleId) ?? []) {
      const bad = buildBadPayload(fault.kind, genuine, fault.seed);
      this.#ledger.noteInjected({
        kind: fault.kind,
        vehicleId,
        updateId: bad.updateId,
        expectedCode: bad.expectedCode,
      });
      this.#count(round, fault.kind);
      const sent = this.#sender.send(vehicleId, bad);
      this.#track(sent, 'bad payload injection failed');
      await sent;
    }
  }

  /** Waits `ms`, or less once `finish()` releases every hold. */
  async #hold(ms: number): Promise<void> {
    if (ms <= 0 || this.#holdsReleased.signal.aborted) return;
    const signal = this.#holdsReleased.signal;
    await delay(ms, undefined, { signal }).catch(() => undefined);
  }

  #count(round: number, kind: FaultKind): void {
    const counts = this.#injected.get(round) ?? {};
    counts[kind] = (counts[kind] ?? 0) + 1;
    this.#injected.set(round, counts);
  }

  #track(work: Promise<unknown>, message: string): void {
    const tracked = work.catch((err: unknown) =>
      this.#log.error({ err }, message),
    );
    this.#work.add(tracked);
    void tracked.finally(() => this.#work.delete(tracked));
  }
}
