/**
 * Shared pieces of the depot tests. FakeFleet stands in for the fleet
 * aggregator on the fleet broker, and useDepotTestBed gives each test two
 * brokers with the depots and vehicles it opens.
 */
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { connect, type MqttClient } from 'mqtt';
import { afterEach, beforeEach } from 'node:test';
import { pino } from 'pino';
import type { RunningBroker } from '../broker/index.ts';
import {
  AckStatus,
  decodePartialAggregate,
  encodeRoundTask,
  encodeUpdateAck,
  type Logger,
  type PartialAggregate,
  type RoundTask,
  decodeUpdateAck,
  encodeModelUpdate,
  type UpdateAck,
} from '../protocol/index.ts';
import { endClient } from '../protocol/mqtt-end.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import { Depot, type DepotOptions } from '../aggregator/depot/index.ts';
import type { Aggregator, RoundClosedEvent } from '../aggregator/index.ts';
import type { VehicleAgent } from '../vehicle-agent/index.ts';
import {
  FLEET_ID,
  TestVehicle,
  buildUpdate,
  quietLog,
  startTestBroker,
  topics,
} from './aggregator-fixtures.ts';

/** Trainable tensors of the depot tests' tasks: small, for fast tests. */
export const SMALL_TENSORS = ['dense2/kernel', 'dense2/bias'];

/** Builds a round task of FLEET_ID for `selected`, open for `timeoutMs`. */
export function buildTask(
  round: number,
  selected: string[],
  timeoutMs = 30_000,
  overrides: Partial<RoundTask> = {},
): RoundTask {
  const openedAtMs = Date.now();
  return {
    fleetId: FLEET_ID,
    round,
    modelName: MODEL_NAME,
    modelVersion: round - 1,
    selectedVehicles: selected,
    training: {
      localEpochs: 1,
      batchSize: 32,
      learningRate: 0.001,
      proximalMu: 0,
      trainableTensors: SMALL_TENSORS,
      restrictToLocalClasses: true,
    },
    openedAtMs,
    deadlineMs: openedAtMs + timeoutMs,
    minUpdates: 1,
    modelSha256: '0'.repeat(64),
    ...overrides,
  };
}

/** Creates a temporary directory, which `remove()` deletes. */
export function createStateDir(): { dir: string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'fleetlearn-depot-'));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Depot options for tests on these brokers: quiet, short timeouts. */
export function depotOptions(
  fleet: RunningBroker,
  depotBroker: RunningBroker,
  stateDir: string,
  overrides: Partial<DepotOptions> = {},
): DepotOptions {
  return {
    depotId: 'depot-a',
    fleetId: FLEET_ID,
    upstreamUrl: `mqtt://127.0.0.1:${fleet.port}`,
    downstreamUrl: `mqtt://127.0.0.1:${depotBroker.port}`,
    stateDir,
    partialAckTimeoutMs: 5000,
    log: quietLog,
    ...overrides,
  };
}

/** Starts a depot and waits until it has handled the retained task. */
export async function startDepot(options: DepotOptions): Promise<Depot> {
  const depot = new Depot(options);
  await depot.start();
  return depot;
}

/** A log line: its message and fields. */
export type LogLine = Record<string, unknown> & { msg: string };

/** Creates a pino logger at debug that keeps every line it writes. */
export function recordingLogger(): { log: Logger; lines: LogLine[] } {
  const lines: LogLine[] = [];
  const stream = new Writable({
    write(chunk, _encoding, done) {
      lines.push(JSON.parse(String(chunk)) as LogLine);
      done();
    },
  });
  return { log: pino({ level: 'debug' }, stream), lines };
}

/** Resolves after `ms`. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Collects every ack a vehicle receives, for checks that none came. */
export function recordAcks(vehicle: TestVehicle): UpdateAck[] {
  const acks: UpdateAck[] = [];
  vehicle.client.on('message', (topic, payload) => {
    if (topic === topics.ack(vehicle.id)) acks.push(decodeUpdateAck(payload));
  });
  return acks;
}

/**
 * Starts a depot with `overrides` for round 1 of veh-1, sends veh-1's update
 * and returns the depot, its first partial and the acks veh-1 receives.
 */
export async function forwardOneUpdate(
  bed: DepotTestBed,
  overrides: Partial<DepotOptions> = {},
): Promise<{ depot: Depot; partial: PartialAggregate; acks: UpdateAck[] }> {
  const task = buildTask(1, ['veh-1']);
  await bed.fleet.publishTask(task);
  const v1 = await bed.vehicle('veh-1');
  const acks = recordAcks(v1);
  const depot = await bed.depot(overrides);
  await v1.publish(encodeModelUpdate(buildUpdate('veh-1', task)));
  const partial = await bed.fleet.nthPartial(1);
  return { depot, partial, acks };
}

/**
 * Starts a depot for round 1 of veh-1 and veh-2, sends both updates and
 * returns its first partial with each vehicle's next ack.
 */
export async function forwardTwoUpdates(
  bed: DepotTestBed,
): Promise<{ partial: PartialAggregate; acks: Array<Promise<UpdateAck>> }> {
  const task = buildTask(1, ['veh-1', 'veh-2']);
  await bed.fleet.publishTask(task);
  const v1 = await bed.vehicle('veh-1');
  const v2 = await bed.vehicle('veh-2');
  await bed.depot();
  await v1.publish(encodeModelUpdate(buildUpdate('veh-1', task)));
  await v2.publish(encodeModelUpdate(buildUpdate('veh-2', task)));
  const partial = await bed.fleet.nthPartial(1);
  return { partial, acks: [v1.nextAck(), v2.nextAck()] };
}

/**
 * A fleet broker, a depot broker, a state directory and a FakeFleet for
 * each test, with the depots and vehicles the test opens through it.
 */
export interface DepotTestBed {
  readonly fleetBroker: RunningBroker;
  readonly depotBroker: RunningBroker;
  readonly stateDir: string;
  readonly fleet: FakeFleet;
  /** Connects a vehicle to the depot broker. */
  vehicle(id: string, isOnline?: boolean): Promise<TestVehicle>;
  /** Starts a depot with depotOptions and `overrides`. */
  depot(overrides?: Partial<DepotOptions>): Promise<Depot>;
}

/**
 * Registers beforeEach and afterEach hooks in the enclosing describe that
 * set up a DepotTestBed before each test and close all of it after.
 */
export function useDepotTestBed(): DepotTestBed {
  let fleetBroker: RunningBroker;
  let depotBroker: RunningBroker;
  let state: { dir: string; remove(): void };
  let fleet: FakeFleet;
  const depots: Depot[] = [];
  const vehicles: TestVehicle[] = [];

  beforeEach(async () => {
    fleetBroker = await startTestBroker();
    depotBroker = await startTestBroker();
    state = createStateDir();
    fleet = await FakeFleet.connect(fleetBroker);
  });

  afterEach(async () => {
    await Promise.all(depots.splice(0).map((depot) => depot.stop()));
    await Promise.all(vehicles.splice(0).map((vehicle) => vehicle.close()));
    await fleet.close();
    await fleetBroker.close();
    await depotBroker.close();
    state.remove();
  });

  return {
    get fleetBroker() {
      return fleetBroker;
    },
    get depotBroker() {
      return depotBroker;
    },
    get stateDir() {
      return state.dir;
    },
    get fleet() {
      return fleet;
    },
    async vehicle(id, isOnline = true) {
      const connected = await TestVehicle.connect(depotBroker, id, isOnline);
      vehicles.push(connected);
      return connected;
    },
    async depot(overrides = {}) {
      const started = await startDepot(
        depotOptions(fleetBroker, depotBroker, state.dir, overrides),
      );
      depots.push(started);
      return started;
    },
  };
}

/** Resolves `check()` once it returns a value, and rejects after `timeoutMs`. */
export async function waitUntil<T>(
  description: string,
  check: () => T | undefined,
  timeoutMs = 20_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) {
      throw new Error(
        `timed out after ${timeoutMs} ms waiting for ${description}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Stand-in for the fleet aggregator: a plain MQTT client on the fleet
 * broker that publishes round tasks, records every partial of one depot
 * and acks them when the test calls `ack()`.
 */
export class FakeFleet {
  readonly client: MqttClient;
  readonly depotId: string;
  readonly partials: PartialAggregate[] = [];

  private constructor(client: MqttClient, depotId: string) {
    this.client = client;
    this.depotId = depotId;
    client.on('message', (topic, payload) => {
      if (topic === topics.depotPartial(depotId)) {
        this.partials.push(decodePartialAggregate(payload));
      }
    });
  }

  static async connect(
    broker: RunningBroker,
    depotId = 'depot-a',
  ): Promise<FakeFleet> {
    const client = connect(`mqtt://127.0.0.1:${broker.port}`, {
      protocolVersion: 4,
      clientId: `fake-fleet-${depotId}`,
      reconnectPeriod: 0,
    });
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => resolve());
      client.once('error', reject);
    });
    await client.subscribeAsync(topics.depotPartial(depotId), { qos: 1 });
    return new FakeFleet(client, depotId);
  }

  /** Publishes `task` retained on the round task topic. */
  async publishTask(task: RoundTask): Promise<void> {
    await this.client.publishAsync(
      topics.roundTask(),
      Buffer.from(encodeRoundTask(task)),
      { qos: 1, retain: true },
    );
  }

  /** Waits for partial number `count` (1 for the first) and returns it. */
  nthPartial(count: number, timeoutMs?: number): Promise<PartialAggregate> {
    return waitUntil(
      `partial #${count} of ${this.depotId}`,
      () => this.partials[count - 1],
      timeoutMs,
    );
  }

  /** Acks `partial` with `status` and, for a rejection, `reasonCode`. */
  async ack(
    partial: PartialAggregate,
    fields: Partial<UpdateAck> = {},
  ): Promise<UpdateAck> {
    const ack: UpdateAck = {
      updateId: partial.partialId,
      round: partial.round,
      status: AckStatus.Accepted,
      reasonCode: '',
      reason: '',
      currentRound: partial.round,
      currentModelVersion: partial.baseModelVersion,
      ...fields,
    };
    await this.client.publishAsync(
      topics.depotAck(this.depotId),
      Buffer.from(encodeUpdateAck(ack)),
      { qos: 1 },
    );
    return ack;
  }

  async close(): Promise<void> {
    await endClient(this.client, 2000);
  }
}

/** Resolves when `agent` deploys `version`, and rejects after 90 s. */
export function deploymentOf(
  agent: VehicleAgent,
  version: number,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`no deployment of v${version} within 90 s`)),
      90_000,
    );
    agent.on('release-deployed', (event) => {
      if (event.version !== version) return;
      clearTimeout(timer);
      resolve();
    });
  });
}

/**
 * Starts `agents`, then `aggregator`, and waits until its first round closes
 * (within `timeoutMs`) and every agent has deployed version 1.
 */
export async function runFirstRound(
  agents: VehicleAgent[],
  aggregator: Aggregator,
  timeoutMs: number,
): Promise<RoundClosedEvent> {
  const deployed = Promise.all(agents.map((agent) => deploymentOf(agent, 1)));
  deployed.catch(() => {}); // Awaited below, after the round closes.
  await Promise.all(agents.map((agent) => agent.start()));

  const roundClosed = once(aggregator, 'round-closed', {
    signal: AbortSignal.timeout(timeoutMs),
  });
  roundClosed.catch(() => {}); // Awaited below, after start().
  await aggregator.start();
  const [closed] = (await roundClosed) as [RoundClosedEvent];
  await deployed;
  return closed;
}
