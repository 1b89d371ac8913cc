/**
 * Per-packet fault decisions on the vehicles' links: which update PUBLISH
 * is cut, repeated, held or followed by a kill, which broker PUBACK or ack
 * is dropped, and when bad payloads go out ahead of a genuine update.
 */
import type { IPublishPacket, Packet } from 'mqtt-packet';
import {
  VehicleState,
  decodeUpdatePayload,
  decodeUpdateAck,
  decodeVehicleStatus,
  type FleetTopics,
} from '../../protocol/index.ts';
import type { FaultKind, LinkFault, RoundFaultPlan } from './faults.ts';
import type { PacketVerdict } from './faulty-link.ts';

/** Services of the injector that the link fault rules call. */
export interface LinkFaultContext {
  readonly topics: FleetTopics;
  /** Returns true once the run has ended and faults must stop. */
  isFinished(): boolean;
  roundPlan(round: number): RoundFaultPlan | undefined;
  /** Deadline of `round` in epoch milliseconds. */
  deadlineOf(round: number): number | undefined;
  count(round: number, kind: FaultKind): void;
  /** Notes a genuine update seen on a link. */
  noteUpdate(updateId: string, vehicleId: string, round: number): void;
  cut(vehicleId: string): void;
  kill(vehicleId: string, round: number, pauseMs: number): void;
  /** Waits `ms`, or less once the run has ended. */
  hold(ms: number): Promise<void>;
  /** Publishes the round's bad payloads for the vehicle and awaits them. */
  injectPayloads(
    vehicleId: string,
    round: number,
    genuine: Buffer,
    plan: RoundFaultPlan,
  ): Promise<void>;
}

/** A vehicle whose TRAINING status acknowledgement triggers a fault. */
interface TrainingTrigger {
  round: number;
  fault: LinkFault;
  /** Message id of the TRAINING status PUBLISH, once seen. */
  messageId?: number;
}

/** State of the link faults of every vehicle. */
export class VehicleLinkFaults {
  readonly #context: LinkFaultContext;
  /** `<vehicle>@<round>` keys whose link fault has struck. */
  readonly #struck = new Set<string>();
  /**
   * `<vehicle>@<round>` keys whose bad payloads went out. A restarted
   * agent trains the round again, and its second update gets none.
   */
  readonly #poisoned = new Set<string>();
  readonly #trainingTriggers = new Map<string, TrainingTrigger>();
  readonly #killOnAck = new Map<
    string,
    { updateId: string; round: number; pauseMs: number }
  >();
  /** `<vehicle>:<messageId>` of broker PUBACKs to drop, and whether to cut after. */
  readonly #pubacksToDrop = new Map<string, { thenCut: boolean }>();

  constructor(context: LinkFaultContext) {
    this.#context = context;
  }

  /**
   * Arms a disconnect-training or mid-training kill fault of `vehicleId`,
   * which has started training for `round`. The fault strikes once the
   * broker acknowledges the TRAINING status, because the agent trains only
   * after that acknowledgement.
   */
  onTrainingStarted(vehicleId: string, round: number): void {
    const fault = this.#context.roundPlan(round)?.linkFaults.get(vehicleId);
    if (fault === undefined || this.#context.isFinished()) return;
    const isTrainingFault =
      fault.kind === 'disconnect-training' ||
      (fault.kind === 'kill-agent' && fault.moment === 'mid-training');
    if (!isTrainingFault || this.#struck.has(`${vehicleId}@${round}`)) return;
    this.#trainingTriggers.set(vehicleId, { round, fault });
  }

  /** Decides on a packet from the agent of `vehicleId` to the broker. */
  async toBroker(vehicleId: string, packet: Packet): Promise<PacketVerdict> {
    const { topics } = this.#context;
    if (packet.cmd !== 'publish') return 'forward';
    if (packet.topic === topics.status(vehicleId)) {
      this.#noteStatus(vehicleId, packet);
      return 'forward';
    }
    if (packet.topic !== topics.update(vehicleId)) return 'forward';

    let update: { updateId: string; round: number };
    try {
      update = decodeUpdatePayload(packet.payload as Buffer);
    } catch {
      return 'forward';
    }
    const { updateId, round } = update;
    this.#context.noteUpdate(updateId, vehicleId, round);
    const plan = this.#context.roundPlan(round);
    if (this.#context.isFinished() || plan === undefined) return 'forward';

    const key = `${vehicleId}@${round}`;
    if (!this.#poisoned.has(key)) {
      this.#poisoned.add(key);
      const payload = packet.payload as Buffer;
      await this.#context.injectPayloads(vehicleId, round, payload, plan);
    }
    const fault = plan.linkFaults.get(vehicleId);
    if (fault?.kind === 'delay-deadline') {
      // Every copy waits, so a resend on a new connection is late too.
      if (!this.#struck.has(key)) this.#context.count(round, fault.kind);
      this.#struck.add(key);
      const deadline = this.#context.deadlineOf(round) ?? Date.now();
      await this.#context.hold(deadline + fault.marginMs - Date.now());
      return 'forward';
    }
    if (fault === undefined || this.#struck.has(key)) return 'forward';
    return this.#strikeOnUpload(vehicleId, round, updateId, packet, fault);
  }

  /** Decides on a packet from the broker to the agent of `vehicleId`. */
  toClient(vehicleId: string, packet: Packet): PacketVerdict {
    if (packet.cmd === 'puback') {
      return this.#onPuback(vehicleId, packet.messageId);
    }
    const ackTopic = this.#context.topics.ack(vehicleId);
    if (packet.cmd !== 'publish' || packet.topic !== ackTopic) {
      return 'forward';
    }
    const kill = this.#killOnAck.get(vehicleId);
    if (kill === undefined) return 'forward';
    let ackedId: string;
    try {
      ackedId = decodeUpdateAck(packet.payload as Buffer).updateId;
    } catch {
      return 'forward';
    }
    if (ackedId !== kill.updateId) return 'forward';
    // The ack never reaches this agent; the broker keeps it for the session.
    this.#killOnAck.delete(vehicleId);
    this.#context.kill(vehicleId, kill.round, kill.pauseMs);
    return 'drop';
  }

  async #strikeOnUpload(
    vehicleId: string,
    round: number,
    updateId: string,
    packet: IPublishPacket,
    fault: LinkFault,
  ): Promise<PacketVerdict> {
    const key = `${vehicleId}@${round}`;
    switch (fault.kind) {
      case 'disconnect-upload':
        this.#struck.add(key);
        this.#context.count(round, fault.kind);
        return {
          cutAfterBytes: Math.floor(fault.cutFraction * packet.payload.length),
        };
      case 'duplicate':
        this.#struck.add(key);
        this.#context.count(round, fault.kind);
        this.#pubacksToDrop.set(`${vehicleId}:${packet.messageId}`, {
          thenCut: fault.method === 'drop-puback',
        });
        return fault.method === 'publish-twice' ? 'duplicate' : 'forward';
      case 'reorder':
        this.#struck.add(key);
        this.#context.count(round, fault.kind);
        await this.#context.hold(fault.holdMs);
        return 'forward';
      case 'kill-agent':
        if (fault.moment === 'after-publish') {
          this.#struck.add(key);
          const { pauseMs } = fault;
          this.#killOnAck.set(vehicleId, { updateId, round, pauseMs });
        }
        return 'forward';
      default:
        return 'forward';
    }
  }

  #onPuback(vehicleId: string, messageId: number | undefined): PacketVerdict {
    const trigger = this.#trainingTriggers.get(vehicleId);
    if (trigger?.messageId !== undefined && trigger.messageId === messageId) {
      // The agent trains once this acknowledgement has arrived.
      this.#trainingTriggers.delete(vehicleId);
      setImmediate(() => this.#strikeWhileTraining(vehicleId, trigger));
      return 'forward';
    }
    const key = `${vehicleId}:${messageId}`;
    const drop = this.#pubacksToDrop.get(key);
    if (drop === undefined) return 'forward';
    this.#pubacksToDrop.delete(key);
    if (drop.thenCut) setImmediate(() => this.#context.cut(vehicleId));
    return 'drop';
  }

  #noteStatus(vehicleId: string, packet: IPublishPacket): void {
    const trigger = this.#trainingTriggers.get(vehicleId);
    if (trigger === undefined || trigger.messageId !== undefined) return;
    try {
      const status = decodeVehicleStatus(packet.payload as Buffer);
      if (status.state !== VehicleState.Training) return;
    } catch {
      return;
    }
    trigger.messageId = packet.messageId;
  }

  #strikeWhileTraining(vehicleId: string, trigger: TrainingTrigger): void {
    const key = `${vehicleId}@${trigger.round}`;
    if (this.#struck.has(key) || this.#context.isFinished()) return;
    this.#struck.add(key);
    if (trigger.fault.kind === 'kill-agent') {
      this.#context.kill(vehicleId, trigger.round, trigger.fault.pauseMs);
      return;
    }
    this.#context.count(trigger.round, trigger.fault.kind);
    this.#context.cut(vehicleId);
  }
}
