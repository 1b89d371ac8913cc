/**
 * The simulated vehicles: one VehicleAgent per vehicle id, which a fault
 * can kill and replace with a new agent on the same state directory.
 */
import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from '../../protocol/index.ts';
import { VehicleAgent } from '../../vehicle-agent/index.ts';
import { settleWithin } from './timing.ts';

/** Time a killed agent gets to end its training run and close its models. */
const KILL_STOP_TIMEOUT_MS = 8000;

/** Outbox directory of an agent's state directory. */
const OUTBOX_DIR = 'outbox';
const OUTBOX_ENTRY_SUFFIX = '.pb';

/** Creates the agent of one vehicle; called again after a kill. */
export type AgentFactory = (vehicleId: string) => VehicleAgent;

/**
 * Holds the current agent of each vehicle, and the retired ones, so that
 * traffic counters keep counting across kills.
 */
export class AgentPool {
  readonly vehicleIds: readonly string[];
  readonly #create: AgentFactory;
  readonly #onAgent: (agent: VehicleAgent) => void;
  readonly #stateDirs: ReadonlyMap<string, string>;
  readonly #log: Logger;
  readonly #current = new Map<string, VehicleAgent>();
  readonly #retired: VehicleAgent[] = [];
  readonly #restarts = new Set<Promise<void>>();

  /**
   * @param stateDirs state directory of each vehicle, by vehicle id, in
   *   start order.
   * @param onAgent called for every agent created, before it starts.
   */
  constructor(options: {
    stateDirs: ReadonlyMap<string, string>;
    create: AgentFactory;
    onAgent: (agent: VehicleAgent) => void;
    log: Logger;
  }) {
    this.vehicleIds = [...options.stateDirs.keys()];
    this.#stateDirs = options.stateDirs;
    this.#create = options.create;
    this.#onAgent = options.onAgent;
    this.#log = options.log;
    for (const vehicleId of this.vehicleIds) this.#spawn(vehicleId);
  }

  /** The current agents, in vehicle order. */
  get agents(): VehicleAgent[] {
    return this.vehicleIds.map((vehicleId) => this.#current.get(vehicleId)!);
  }

  agentOf(vehicleId: string): VehicleAgent | undefined {
    return this.#current.get(vehicleId);
  }

  /** Agent restarts still in progress. */
  get pendingRestarts(): number {
    return this.#restarts.size;
  }

  /** Round task and release bytes every agent, current or retired, received. */
  get bytesReceived(): number {
    return [...this.#current.values(), ...this.#retired].reduce(
      (sum, agent) => sum + agent.counters.bytesReceived,
      0,
    );
  }

  /** Outbox entries of the current agents awaiting their ack. */
  get outboxPending(): number {
    return this.agents.reduce(
      (sum, agent) => sum + agent.counters.outboxPending,
      0,
    );
  }

  startAll(): Promise<void[]> {
    return Promise.all(this.agents.map((agent) => agent.start()));
  }

  async stopAll(): Promise<void> {
    await Promise.allSettled([...this.#restarts]);
    await Promise.allSettled(this.agents.map((agent) => agent.stop()));
  }

  /**
   * Kills the agent of `vehicleId` and starts a new one after `pauseMs`.
   * The caller cuts the agent's connection first, so that the agent
   * cannot publish its OFFLINE status and the broker sends the last will.
   * The old agent is then stopped, which aborts its training run: the
   * in-memory state is gone as after a crash, and only the state
   * directory carries over.
   */
  kill(vehicleId: string, pauseMs: number): Promise<void> {
    const old = this.#current.get(vehicleId);
    if (old === undefined) {
      return Promise.reject(
        new RangeError(`no agent for vehicle ${vehicleId}`),
      );
    }
    const restart = this.#replace(vehicleId, old, pauseMs);
    this.#restarts.add(restart);
    void restart.finally(() => this.#restarts.delete(restart));
    return restart;
  }

  /** Update ids, with their files, left in each vehicle's outbox directory. */
  async listOutboxFiles(): Promise<Map<string, string>> {
    const files = new Map<string, string>();
    for (const stateDir of this.#stateDirs.values()) {
      const dir = path.join(stateDir, OUTBOX_DIR);
      let names: string[];
      try {
        names = await readdir(dir);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw err;
      }
      for (const name of names) {
        if (!name.endsWith(OUTBOX_ENTRY_SUFFIX)) continue;
        const updateId = name.slice(0, -OUTBOX_ENTRY_SUFFIX.length);
        files.set(updateId, path.join(dir, name));
      }
    }
    return files;
  }

  async #replace(
    vehicleId: string,
    old: VehicleAgent,
    pauseMs: number,
  ): Promise<void> {
    const stopped = settleWithin(old.stop(), KILL_STOP_TIMEOUT_MS);
    await delay(pauseMs);
    if (!(await stopped)) {
      this.#log.warn(
        { vehicleId, timeoutMs: KILL_STOP_TIMEOUT_MS },
        'killed agent did not stop in time',
      );
    }
    this.#retired.push(old);
    const agent = this.#spawn(vehicleId);
    await agent.start();
    this.#log.info({ vehicleId, pauseMs }, 'killed agent restarted');
  }

  #spawn(vehicleId: string): VehicleAgent {
    const agent = this.#create(vehicleId);
    this.#current.set(vehicleId, agent);
    this.#onAgent(agent);
    return agent;
  }
}
