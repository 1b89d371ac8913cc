/**
 * The depot aggregator process. It relays the fleet's rounds and releases
 * to the depot broker and the vehicles' statuses to the fleet. It merges
 * the vehicles' updates of each round into one partial for the fleet
 * aggregator, and acks the vehicles once the fleet has acked the partial.
 */
import { EventEmitter } from 'node:events';
import {
  FleetTopics,
  decodeUpdateAck,
  encodeUpdateAck,
  isFleetError,
  type FleetError,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import { endClient, settleWithin } from '../../protocol/mqtt-end.ts';
import { VehicleRegistry } from '../vehicles.ts';
import { assertDistinctBrokers } from './broker-addresses.ts';
import { type UpdateCaps } from './collector.ts';
import { openSide, publishQos1, type OpenedSide } from './connection.ts';
import type { DepotEvents } from './events.ts';
import { PartialForwarder } from './forwarder.ts';
import { DepotJournal, createStateDir } from './journal.ts';
import {
  resolveDepotOptions,
  type DepotOptions,
  type ResolvedDepotOptions,
} from './options.ts';
import { DepotPresence } from './presence.ts';
import {
  Relay,
  downstreamRelayFilters,
  isRelayedDown,
  isRelayedUp,
  upstreamRelayFilters,
} from './relay.ts';
import { RoundFlow } from './round-flow.ts';

/**
 * How long the depot waits at start for the fleet's retained round task
 * before it takes updates, so that updates its broker queued while it
 * was down are judged against that task rather than rejected.
 */
export const TASK_WAIT_MS = 2000;
/**
 * Time after the connection to the depot broker before the depot treats
 * its list of online vehicles as complete. The broker sends the retained
 * statuses in a burst after the subscription. An estimate, ample on loopback.
 */
export const STATUS_SETTLE_MS = 1000;

/** Time `stop()` waits for the message in hand and for each disconnect. */
const STOP_TIMEOUT_MS = 2000;

type Phase = 'new' | 'starting' | 'running' | 'stopping' | 'stopped';

/**
 * A depot aggregator. Vehicles of the depot connect to the depot broker
 * (downstream). The depot connects to it as `depot-<depotId>-down` and to
 * the fleet broker (upstream) as `depot-<depotId>-up`, both times with a
 * persistent session.
 *
 * Events: 'round-started', 'update-decided', 'partial-forwarded',
 * 'partial-settled' and 'failed' (see events.ts).
 */
export class Depot extends EventEmitter<DepotEvents> {
  readonly options: ResolvedDepotOptions;
  readonly #log: Logger;
  readonly #topics: FleetTopics;
  readonly #stopping = new AbortController();
  readonly #vehicles = new VehicleRegistry();
  readonly #flow: RoundFlow;
  readonly #relay: Relay;
  #presence: DepotPresence | undefined;
  /** The error the depot stopped on by itself, if any. */
  #failure: FleetError | undefined;
  #phase: Phase = 'new';
  #up: OpenedSide | undefined;
  #down: OpenedSide | undefined;
  /** Gate that opens after the first round task or after TASK_WAIT_MS. */
  readonly #taskGate: Promise<void>;
  #openTaskGate: () => void = () => undefined;
  #stopped: Promise<void> | undefined;
  #membersTimer: NodeJS.Timeout | undefined;

  /**
   * Checks and stores the options. Nothing connects until `start()`.
   *
   * @throws {TypeError} for a missing id or URL.
   * @throws {FleetError} INVALID_CONFIG naming an option that cannot work.
   */
  constructor(options: DepotOptions) {
    super();
    this.options = resolveDepotOptions(options);
    const { depotId, fleetId } = this.options;
    this.#log = this.options.log.child({
      component: 'depot',
      depotId,
      fleetId,
    });
    this.#topics = new FleetTopics(fleetId);
    this.#relay = new Relay(this.#topics, this.#log);
    this.#taskGate = new Promise((resolve) => {
      this.#openTaskGate = resolve;
    });
    const caps: UpdateCaps = {
      maxExamplesPerUpdate: this.options.maxExamplesPerUpdate,
      maxAbsDeltaValue: this.options.maxAbsDeltaValue,
      maxMessageBytes: this.options.maxMessageBytes,
    };
    this.#flow = new RoundFlow({
      depotId,
      caps,
      forwardMarginMs: this.options.forwardMarginMs,
      journal: new DepotJournal(this.options.stateDir),
      forwarder: new PartialForwarder({
        publish: (bytes) => this.#publishPartial(bytes),
        ackTimeoutMs: this.options.partialAckTimeoutMs,
        log: this.#log,
      }),
      members: () => new Set(this.#vehicles.onlineIds()),
      publishAck: (vehicleId, ack) => this.#publishAck(vehicleId, ack),
      emit: this.emit.bind(this),
      log: this.#log,
    });
  }

  /**
   * Checks that the two URLs reach two brokers, creates the state
   * directory, reads the partials still awaiting the fleet's ack, connects
   * to both brokers and waits up to TASK_WAIT_MS for the fleet's retained
   * round task. It keeps retrying a broker that is down until it accepts
   * or `stop()` is called.
   *
   * @throws {FleetError} INVALID_CONFIG when both URLs reach one broker,
   *   when the state directory cannot be created, or when another depot
   *   with this id turns out to be running while this one starts.
   * @throws {Error} when called twice, or when `stop()` ran meanwhile.
   */
  async start(): Promise<void> {
    if (this.#phase !== 'new') {
      throw new Error(
        `depot start failed: the depot is ${this.#phase}, and start() ` +
          'runs only once. Create a new Depot to start again.',
      );
    }
    this.#phase = 'starting';

    try {
      await this.#startSteps();
    } catch (err) {
      throw this.#failure ?? err;
    }
    if (this.#failure !== undefined) throw this.#failure;

    this.#phase = 'running';
    const { upstreamUrl, downstreamUrl, stateDir } = this.options;
    this.#log.info(
      { upstreamUrl, downstreamUrl, stateDir, round: this.#flow.round?.round },
      'depot started',
    );
  }

  async #startSteps(): Promise<void> {
    const { upstreamUrl, downstreamUrl, stateDir } = this.options;
    await assertDistinctBrokers(upstreamUrl, downstreamUrl, this.#log);
    await createStateDir(stateDir);
    // Loaded before the subscription delivers acks queued in the session.
    await this.#flow.loadUnsettled();

    const signal = this.#stopping.signal;
    signal.addEventListener('abort', () => this.#openTaskGate(), {
      once: true,
    });
    this.#up = this.#openUpstream(signal);
    this.#down = this.#openDownstream(signal);

    await this.#up.connected;
    const gateTimer = setTimeout(() => this.#openTaskGate(), TASK_WAIT_MS);
    await this.#taskGate;
    clearTimeout(gateTimer);

    await this.#down.connected;
    this.#membersTimer = setTimeout(
      () => void this.#flow.markMembersKnown(),
      STATUS_SETTLE_MS,
    );
    if (this.#phase !== 'starting') {
      throw new Error('depot start failed: stop() was called while starting');
    }
  }

  #openUpstream(signal: AbortSignal): OpenedSide {
    const { depotId, upstreamUrl } = this.options;
    const clientId = `depot-${depotId}-up`;
    const presence = new DepotPresence({
      depotId,
      topic: this.#topics.depotPresence(depotId),
      clientId,
      log: this.#log,
    });
    this.#presence = presence;
    const side = openSide({
      side: 'upstream',
      url: upstreamUrl,
      clientId,
      subscriptions: [
        ...downstreamRelayFilters(this.#topics),
        this.#topics.depotAck(depotId),
      ],
      handleMessage: (topic, payload) => this.#onUpstream(topic, payload),
      onSessionLost: () =>
        this.#relay.copyAgainFrom(this.#down?.client, 'downstream'),
      will: presence.will(),
      signal,
      log: this.#log,
    });
    presence.attach(side.client);
    return side;
  }

  #openDownstream(signal: AbortSignal): OpenedSide {
    const { depotId, downstreamUrl } = this.options;
    return openSide({
      side: 'downstream',
      url: downstreamUrl,
      clientId: `depot-${depotId}-down`,
      subscriptions: [
        ...upstreamRelayFilters(this.#topics),
        this.#topics.allUpdates(),
      ],
      handleMessage: (topic, payload) => this.#onDownstream(topic, payload),
      onSessionLost: () =>
        this.#relay.copyAgainFrom(this.#up?.client, 'upstream'),
      signal,
      log: this.#log,
    });
  }

  /**
   * Stops forwarding, lets the message in hand finish (up to
   * STOP_TIMEOUT_MS) and disconnects from both brokers. Updates merged but
   * not yet counted by the fleet stay in the journal for the next start.
   */
  stop(): Promise<void> {
    this.#stopped ??= this.#stopSteps();
    return this.#stopped;
  }

  async #stopSteps(): Promise<void> {
    const wasStarted = this.#phase !== 'new';
    this.#phase = 'stopping';
    this.#stopping.abort();
    clearTimeout(this.#membersTimer);
    this.#flow.close();

    if (wasStarted) {
      await settleWithin(this.#flow.idle(), STOP_TIMEOUT_MS);
      if (this.#up?.client.connected === true) {
        this.#presence?.publishOffline(this.#up.client);
      }
      const clients = [this.#up?.client, this.#down?.client];
      await Promise.all(
        clients.map((client) =>
          client === undefined ? undefined : endClient(client, STOP_TIMEOUT_MS),
        ),
      );
      this.#log.info('depot stopped');
    }
    this.#phase = 'stopped';
  }

  /**
   * Stops the depot because of `err`, and emits 'failed' once stopped. A
   * start in progress rejects with `err`.
   */
  #fail(err: FleetError): void {
    if (this.#failure !== undefined || this.#stopped !== undefined) return;
    this.#failure = err;
    this.#log.error({ err }, 'depot stopping on an error');
    void this.stop().then(() => this.emit('failed', err));
  }

  async #onUpstream(topic: string, payload: Buffer): Promise<void> {
    const { depotId } = this.options;
    if (topic === this.#topics.depotAck(depotId)) {
      this.#onFleetAck(payload);
      return;
    }
    if (topic === this.#topics.depotPresence(depotId)) {
      const conflict = this.#presence?.receive(payload);
      if (conflict !== undefined) this.#fail(conflict);
      return;
    }
    if (topic === this.#topics.roundTask()) {
      // The task is handled before it is relayed, so that no vehicle can
      // send an update for a round the depot has not received yet.
      await this.#flow.onRoundTask(payload);
      this.#openTaskGate();
    }
    if (isRelayedDown(this.#topics, topic)) {
      this.#relay.copy(this.#down?.client, 'downstream', topic, payload);
    }
  }

  async #onDownstream(topic: string, payload: Buffer): Promise<void> {
    const vehicleId = this.#topics.vehicleIdOf(topic);
    if (vehicleId === undefined) return;
    if (topic === this.#topics.update(vehicleId)) {
      await this.#taskGate;
      if (this.#stopping.signal.aborted) return;
      await this.#flow.onUpdate(vehicleId, payload);
      return;
    }
    if (!isRelayedUp(this.#topics, topic)) return;
    if (topic === this.#topics.status(vehicleId)) {
      this.#vehicles.applyStatusMessage(vehicleId, payload, this.#log);
      // A member going offline may leave every remaining one decided.
      await this.#flow.checkForward();
    }
    this.#relay.copy(this.#up?.client, 'upstream', topic, payload);
  }

  #onFleetAck(payload: Buffer): void {
    let ack: UpdateAck;
    try {
      ack = decodeUpdateAck(payload);
    } catch (err) {
      if (!isFleetError(err)) throw err;
      this.#log.warn(
        { code: err.code, reason: err.message, bytes: payload.length },
        'invalid partial ack from the fleet',
      );
      return;
    }
    this.#flow.onFleetAck(ack);
  }

  #publishPartial(bytes: Uint8Array): void {
    const client = this.#up?.client;
    if (client === undefined) return;
    const topic = this.#topics.depotPartial(this.options.depotId);
    publishQos1(client, topic, bytes, this.#log);
  }

  #publishAck(vehicleId: string, ack: UpdateAck): void {
    const client = this.#down?.client;
    if (client === undefined) return;
    const topic = this.#topics.ack(vehicleId);
    publishQos1(client, topic, encodeUpdateAck(ack), this.#log, { vehicleId });
  }
}
