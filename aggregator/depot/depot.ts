/**
 * The depot aggregator process. It relays the fleet's rounds and releases
 * to the depot broker and the vehicles' statuses to the fleet. It merges
 * the vehicles' updates of each round into one partial for the fleet
 * aggregator, and acks the vehicles once the fleet has acked the partial.
 */
import { EventEmitter } from 'node:events';
import { mkdir } from 'node:fs/promises';
import {
  ErrorCode,
  FleetError,
  FleetTopics,
  decodeUpdateAck,
  encodeUpdateAck,
  isFleetError,
  type Logger,
  type UpdateAck,
} from '../../protocol/index.ts';
import { endClient, settleWithin } from '../../protocol/mqtt-end.ts';
import { VehicleRegistry } from '../vehicles.ts';
import { type UpdateCaps } from './collector.ts';
import { openSide, subscribe, type OpenedSide } from './connection.ts';
import type { DepotEvents } from './events.ts';
import { PartialForwarder } from './forwarder.ts';
import { DepotJournal } from './journal.ts';
import {
  resolveDepotOptions,
  type DepotOptions,
  type ResolvedDepotOptions,
} from './options.ts';
import {
  downstreamRelayFilters,
  isRelayedDown,
  isRelayedUp,
  relayMessage,
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
 * Time after the connection to the depot broker before the depot counts
 * on knowing which vehicles are online there: the broker sends the
 * retained statuses after the subscription, in a burst. An estimate,
 * ample on loopback.
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
 * Events: 'round-started', 'update-decided', 'partial-forwarded' and
 * 'partial-settled' (see events.ts).
 */
export class Depot extends EventEmitter<DepotEvents> {
  readonly options: ResolvedDepotOptions;
  readonly #log: Logger;
  readonly #topics: FleetTopics;
  readonly #stopping = new AbortController();
  readonly #vehicles = new VehicleRegistry();
  readonly #flow: RoundFlow;
  #phase: Phase = 'new';
  #up: OpenedSide | undefined;
  #down: OpenedSide | undefined;
  /** Opens once the first round task was handled, or after TASK_WAIT_MS. */
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
   * Creates the state directory, connects to both brokers and waits up to
   * TASK_WAIT_MS for the fleet's retained round task. It keeps retrying a
   * broker that is down until it accepts or `stop()` is called.
   *
   * @throws {FleetError} INVALID_CONFIG when the state directory cannot
   *   be created.
   * @throws {Error} when called twice, or when `stop()` ran meanwhile.
   */
  async start(): Promise<void> {
    if (this.#phase !== 'new') {
      throw new Error(`depot cannot start: it is ${this.#phase}`);
    }
    this.#phase = 'starting';
    await this.#createStateDir();
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
      throw new Error('depot stopped while starting');
    }

    this.#phase = 'running';
    const { upstreamUrl, downstreamUrl, stateDir } = this.options;
    this.#log.info(
      { upstreamUrl, downstreamUrl, stateDir, round: this.#flow.round?.round },
      'depot started',
    );
  }

  async #createStateDir(): Promise<void> {
    const { stateDir } = this.options;
    try {
      await mkdir(stateDir, { recursive: true });
    } catch (err) {
      throw new FleetError(
        ErrorCode.InvalidConfig,
        `depot state directory ${stateDir} cannot be created: ` +
          (err as Error).message,
        { cause: err },
      );
    }
  }

  #openUpstream(signal: AbortSignal): OpenedSide {
    const { depotId, upstreamUrl } = this.options;
    return openSide({
      side: 'upstream',
      url: upstreamUrl,
      clientId: `depot-${depotId}-up`,
      subscriptions: [
        ...downstreamRelayFilters(this.#topics),
        this.#topics.depotAck(depotId),
      ],
      handleMessage: (topic, payload) => this.#onUpstream(topic, payload),
      onSessionLost: () => this.#resubscribe(this.#down, 'downstream'),
      signal,
      log: this.#log,
    });
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
      onSessionLost: () => this.#resubscribe(this.#up, 'upstream'),
      signal,
      log: this.#log,
    });
  }

  /**
   * Stops forwarding, lets the message in hand finish (at most about
   * 2 s) and disconnects from both brokers. Updates merged but not yet
   * counted by the fleet stay in the journal for the next start.
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

  async #onUpstream(topic: string, payload: Buffer): Promise<void> {
    if (topic === this.#topics.depotAck(this.options.depotId)) {
      this.#onFleetAck(payload);
      return;
    }
    if (topic === this.#topics.roundTask()) {
      // The task is handled before it is relayed, so that no vehicle can
      // send an update for a round the depot does not know yet.
      await this.#flow.onRoundTask(payload);
      this.#openTaskGate();
    }
    if (isRelayedDown(this.#topics, topic) && this.#down !== undefined) {
      relayMessage(this.#down.client, 'downstream', topic, payload, this.#log);
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
    if (this.#up !== undefined) {
      relayMessage(this.#up.client, 'upstream', topic, payload, this.#log);
    }
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
    client.publish(topic, Buffer.from(bytes), { qos: 1 }, (err) => {
      if (err !== undefined && err !== null) {
        this.#log.warn({ err, topic }, 'partial publish failed');
      }
    });
  }

  #publishAck(vehicleId: string, ack: UpdateAck): void {
    const client = this.#down?.client;
    if (client === undefined) return;
    const topic = this.#topics.ack(vehicleId);
    const bytes = Buffer.from(encodeUpdateAck(ack));
    client.publish(topic, bytes, { qos: 1 }, (err) => {
      if (err !== undefined && err !== null) {
        this.#log.warn({ err, vehicleId, topic }, 'ack publish failed');
      }
    });
  }

  /**
   * Subscribes again to the topics relayed from `side`, after the other
   * broker lost its session and with it the retained copies: the new
   * subscription delivers the retained messages again, which are copied.
   */
  #resubscribe(side: OpenedSide | undefined, name: string): void {
    if (side === undefined) return;
    const filters =
      name === 'upstream'
        ? downstreamRelayFilters(this.#topics)
        : upstreamRelayFilters(this.#topics);
    this.#log.info({ side: name, filters }, 'copying retained messages again');
    subscribe(side.client, filters).catch((err: unknown) =>
      this.#log.warn({ err, side: name }, 'subscription failed'),
    );
  }
}
