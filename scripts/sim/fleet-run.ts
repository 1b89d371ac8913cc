/**
 * The federated part of a simulation: the embedded broker, the aggregator
 * and the vehicle agents, optionally behind faulty links, from the first
 * round to the delivery ledger's verdict.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { AggregatorOptions } from '../../aggregator/index.ts';
import { startBroker } from '../../broker/index.ts';
import { decodeUpdatePayload, FleetTopics } from '../../protocol/index.ts';
import { VehicleAgent } from '../../vehicle-agent/index.ts';
import { AgentPool } from './agent-pool.ts';
import { AggregatorHost } from './aggregator-host.ts';
import type { FleetData } from './data.ts';
import { FaultInjector, type FaultRecord } from './fault-injector.ts';
import { FaultPlan } from './faults.ts';
import type { SimulationOptions } from './fleet.ts';
import { DeliveryLedger, type DeliverySummary } from './ledger.ts';
import type { RoundProgress } from './progress.ts';
import type { RoundRow } from './report.ts';
import { RoundRecorder } from './round-rows.ts';
import { provisionSecureFleet, type SecureFleet } from './secure-fleet.ts';
import { waitUntil } from './timing.ts';

import { selectAttackers, vehicleAttack } from './attackers.ts';

const FLEET_ID = 'sim';
const PROBE_IMAGES = 64;
/** Time the end of a run waits for every outbox to empty. */
const DRAIN_TIMEOUT_MS = 30_000;

/** Inputs of {@link runFleet}. */
export interface FleetRunInput {
  options: SimulationOptions;
  data: FleetData;
  baseWeightsPath: string;
  stateDir: string;
  minUpdates: number;
  progress: RoundProgress;
}

/** Outcome of {@link runFleet}. */
export interface FleetRunResult {
  rows: RoundRow[];
  delivery: DeliverySummary;
  /** Undefined in a run without faults. */
  faults: FaultRecord | undefined;
  /** Version of the global model at the end. */
  modelVersion: number;
  /** True when the run used mutual TLS, the broker ACL and signing. */
  secure: boolean;
  /** Vehicles that attacked, sorted. */
  attackerIds: string[];
  /** True when the aggregator stopped early on a spent privacy budget. */
  privacyBudgetSpent: boolean;
}

/**
 * Runs the requested rounds, then waits up to 30 s for every vehicle's
 * outbox to empty, stops everything and checks the ledger. With
 * `options.secure` it first provisions a temporary PKI, and deletes it
 * at the end.
 */
export async function runFleet(input: FleetRunInput): Promise<FleetRunResult> {
  const { options } = input;
  const log = options.log.child({ component: 'sim' });
  const stateDirs = vehicleStateDirs(input);
  const secure = options.secure
    ? await provisionSecureFleet(FLEET_ID, [...stateDirs.keys()], log)
    : undefined;
  try {
    return await runSecuredFleet(input, stateDirs, secure);
  } finally {
    secure?.remove();
  }
}

async function runSecuredFleet(
  input: FleetRunInput,
  stateDirs: Map<string, string>,
  secure: SecureFleet | undefined,
): Promise<FleetRunResult> {
  const { options, progress } = input;
  const root = options.log;
  const log = root.child({ component: 'sim' });
  const broker = await startBroker({
    port: 0,
    host: '127.0.0.1',
    log: root,
    tls: secure?.brokerTls,
  });
  const scheme = secure === undefined ? 'mqtt' : 'mqtts';
  const brokerUrl = `${scheme}://127.0.0.1:${broker.port}`;
  const vehicleIds = [...stateDirs.keys()];
  const attackers = new Set(selectAttackers(vehicleIds, options.attackers));
  const ledger = new DeliveryLedger();
  const injector =
    options.faults.length === 0
      ? undefined
      : createInjector(options, broker.port, vehicleIds, ledger);

  let pool: AgentPool | undefined;
  const recorder = new RoundRecorder({
    progress,
    bytesReceived: () => pool?.bytesReceived ?? 0,
    log,
  });
  const host = new AggregatorHost({
    options: { ...aggregatorOptions(input), ...secure?.aggregator },
    rounds: options.rounds,
    onInstance: (aggregator) => {
      recorder.attachAggregator(aggregator);
      aggregator.on('update-decided', (event) => ledger.noteDecision(event));
      aggregator.on('round-opened', (event) =>
        ledger.noteRoundOpened(event.round, event.selected),
      );
      injector?.attachAggregator(aggregator);
    },
    log,
  });

  try {
    await injector?.start();
    pool = new AgentPool({
      stateDirs,
      create: (vehicleId) =>
        new VehicleAgent({
          vehicleId,
          fleetId: FLEET_ID,
          brokerUrl: injector?.vehicleUrl(vehicleId) ?? brokerUrl,
          stateDir: stateDirs.get(vehicleId)!,
          ...vehicleAttack(
            options,
            attackers.has(vehicleId),
            input.data.shares[vehicleIds.indexOf(vehicleId)],
          ),
          seed: options.seed,
          log: root,
          ...secure?.vehicle(vehicleId),
        }),
      onAgent: (agent) => {
        recorder.attachAgent(agent);
        noteAgentUpdates(agent, ledger);
        injector?.attachAgent(agent);
      },
      log,
    });
    injector?.bind({
      agents: pool,
      aggregators: host,
      onRoundInterrupted: (round, modelVersion) =>
        recorder.noteInterruptedRound(round, modelVersion),
    });

    await host.start(injector?.aggregatorUrl ?? brokerUrl);
    if (host.current.liveViewUrl !== undefined) {
      console.error(`live view: ${host.current.liveViewUrl}`);
    }
    await pool.startAll();
    await host.whenFinished();
    await injector?.finish();
    await drainOutboxes(pool, injector, log);
  } finally {
    progress.stop();
    await host.stop();
    await pool?.stopAll();
    await injector?.close();
    await broker.close();
  }

  const pendingIds = await noteOutboxLeftovers(pool, ledger);
  return {
    rows: recorder.rows(injector?.injectedByRound),
    delivery: ledger.summarize(pendingIds),
    faults: injector?.record(),
    modelVersion: host.current.currentModelVersion,
    secure: secure !== undefined,
    attackerIds: [...attackers].sort(),
    privacyBudgetSpent: host.current.isPrivacyBudgetSpent,
  };
}

/** Returns the state directory of each vehicle, by vehicle id, in order. */
function vehicleStateDirs(input: FleetRunInput): Map<string, string> {
  return new Map(
    input.data.shares.map((_, index) => [
      `veh-${String(index + 1).padStart(3, '0')}`,
      path.join(input.stateDir, `vehicle-${index + 1}`),
    ]),
  );
}

function createInjector(
  options: SimulationOptions,
  brokerPort: number,
  vehicleIds: string[],
  ledger: DeliveryLedger,
): FaultInjector {
  const plan = new FaultPlan({
    kinds: options.faults,
    rate: options.faultRate,
    seed: options.seed,
    rounds: options.rounds,
  });
  return new FaultInjector({
    plan,
    topics: new FleetTopics(FLEET_ID),
    brokerPort,
    vehicleIds,
    ledger,
    log: options.log.child({ component: 'sim' }),
  });
}

/** Notes every update the agent sends or resends as finished. */
function noteAgentUpdates(agent: VehicleAgent, ledger: DeliveryLedger): void {
  const { vehicleId } = agent;
  agent.on('update-sent', ({ updateId, round }) =>
    ledger.noteFinished(updateId, vehicleId, round, 'sent'),
  );
  agent.on('update-resent', ({ updateId, round }) =>
    ledger.noteFinished(updateId, vehicleId, round, 'resent'),
  );
  agent.on('secure-input-ready', ({ round }) =>
    ledger.noteSecureInput(vehicleId, round),
  );
}

function aggregatorOptions(
  input: FleetRunInput,
): Omit<AggregatorOptions, 'brokerUrl' | 'maxRounds'> {
  const { options, data } = input;
  return {
    fleetId: FLEET_ID,
    stateDir: path.join(input.stateDir, 'aggregator'),
    baseWeightsPath: input.baseWeightsPath,
    trainableLayers: options.trainLayers,
    localEpochs: options.localEpochs,
    batchSize: options.batchSize,
    learningRate: options.learningRate,
    proximalMu: options.proximalMu,
    restrictToLocalClasses: options.restrictToLocalClasses,
    vehiclesPerRound: 0,
    minVehiclesOnline: options.vehicles,
    onlineWaitTimeoutMs: onlineWaitTimeoutMs(options),
    minUpdates: input.minUpdates,
    roundTimeoutMs: options.roundTimeoutMs,
    seed: options.seed,
    aggregation: options.aggregation,
    byzantineCount: options.byzantineCount,
    trimFraction: options.trimFraction,
    multiKrumSelect: options.multiKrumSelect,
    differentialPrivacy: options.differentialPrivacy,
    secureAggregation: options.secureAggregation,
    asyncBuffer: options.asyncBuffer,
    updateCompression: options.updateCompression,
    liveViewPort: options.liveViewPort,
    serverOptimizer: options.serverOptimizer,
    normBound: options.normBound,
    probeImages: data.test.images.subarray(0, PROBE_IMAGES * 32 * 32 * 3),
    probeCount: Math.min(PROBE_IMAGES, data.test.count),
    testSet: { images: data.test.images, labels: data.test.labels },
    log: options.log,
  };
}

/**
 * Returns how long a round waits for every vehicle to be online: 120 s,
 * or three round deadlines under faults. A faulty run can leave the
 * aggregator believing a connected vehicle is offline (a stale retained
 * OFFLINE status after its restart), and the shorter wait keeps such a
 * round from stalling the run. The `selected` column of the report shows
 * the rounds that opened without every vehicle.
 */
function onlineWaitTimeoutMs(options: SimulationOptions): number {
  return options.faults.length === 0 ? 120_000 : 3 * options.roundTimeoutMs;
}

/**
 * Waits until every outbox is empty and the injector is idle. A timeout
 * is logged, not thrown: the ledger reports what was left.
 */
async function drainOutboxes(
  pool: AgentPool,
  injector: FaultInjector | undefined,
  log: SimulationOptions['log'],
): Promise<void> {
  const isDrained = (): boolean =>
    pool.outboxPending === 0 &&
    pool.pendingRestarts === 0 &&
    (injector?.isIdle ?? true);
  const started = Date.now();
  if (await waitUntil(isDrained, DRAIN_TIMEOUT_MS)) return;
  log.warn(
    {
      outboxPending: pool.outboxPending,
      pendingRestarts: pool.pendingRestarts,
      durationMs: Date.now() - started,
    },
    'outboxes not empty at the end of the run',
  );
}

/**
 * Notes the entries left in the outboxes as finished updates, so that one
 * never published is counted as lost; returns their update ids.
 */
async function noteOutboxLeftovers(
  pool: AgentPool | undefined,
  ledger: DeliveryLedger,
): Promise<Set<string>> {
  const files = (await pool?.listOutboxFiles()) ?? new Map<string, string>();
  for (const [updateId, file] of files) {
    try {
      const update = decodeUpdatePayload(await readFile(file));
      ledger.noteFinished(updateId, update.vehicleId, update.round, 'outbox');
    } catch {
      // The agent moves such a file aside on its next start.
      ledger.noteFinished(updateId, 'unknown', 0, 'outbox');
    }
  }
  return new Set(files.keys());
}
