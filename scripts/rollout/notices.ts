/**
 * The messages a rollout publishes: the candidate's chunks, its signed
 * candidate notice with the cohort rule, and, on full promotion or a
 * pin, a fleet-wide notice on the release topic.
 */
import type { PublishRetained } from '../../aggregator/release-publisher.ts';
import {
  encodeRelease,
  type EncodedRelease,
} from '../../aggregator/release-messages.ts';
import type { ReleaseSigner } from '../../aggregator/release-signer.ts';
import type { StoredModel } from '../../aggregator/model-store.ts';
import {
  COHORT_BUCKETS,
  checkCohortRule,
  encodeModelRelease,
  type CandidateRollout,
  type FleetTopics,
  type ModelRelease,
} from '../../protocol/index.ts';
import type { RolloutState } from './state.ts';

/** Options of {@link NoticePublisher}. */
export interface NoticePublisherOptions {
  topics: FleetTopics;
  maxMessageBytes: number;
  /** Signs every notice; without it notices go out unsigned. */
  signer: ReleaseSigner | undefined;
  publish: PublishRetained;
}

/**
 * Builds the candidate field of the current stage's notice, in `state`
 * (one of CandidateState).
 */
export function candidateOf(
  rollout: RolloutState,
  state: number,
): CandidateRollout {
  const stage = rollout.stages[rollout.stageIndex];
  return {
    rolloutId: rollout.rolloutId,
    state,
    stage: rollout.stageIndex,
    cohort: checkCohortRule({
      basisPoints: Math.round((stage.percent / 100) * COHORT_BUCKETS),
      hashSalt: rollout.hashSalt,
      vehicleIds: rollout.vehicleIds,
      tags: rollout.cohortTags,
    }),
    shadow: stage.shadow,
    stableVersion: rollout.stableVersion,
  };
}

/** Publishes chunks and notices of stored model versions. */
export class NoticePublisher {
  constructor(private readonly options: NoticePublisherOptions) {}

  /** Publishes every chunk of `model`, retained; returns the encoding. */
  async publishChunks(model: StoredModel): Promise<EncodedRelease> {
    const { topics, maxMessageBytes, publish } = this.options;
    const encoded = encodeRelease(model.manifest, model.onnx, maxMessageBytes);
    const { version } = model.manifest;
    for (const [index, chunk] of encoded.chunks.entries()) {
      await publish(topics.releaseChunk(version, index), chunk);
    }
    return encoded;
  }

  /**
   * Publishes the chunks, then the candidate notice of `model` with
   * `candidate`. Returns the release sequence (0 unsigned).
   */
  async publishCandidate(
    model: StoredModel,
    candidate: CandidateRollout,
  ): Promise<number> {
    const encoded = await this.publishChunks(model);
    const release = { ...encoded.release, candidate };
    return this.publishNotice(this.options.topics.candidateRelease(), release);
  }

  /**
   * Publishes the candidate notice of `model` with `candidate` without
   * its chunks, for a withdrawal or a promotion.
   */
  async publishCandidateState(
    model: StoredModel,
    candidate: CandidateRollout,
  ): Promise<number> {
    const { maxMessageBytes } = this.options;
    const encoded = encodeRelease(model.manifest, model.onnx, maxMessageBytes);
    const release = { ...encoded.release, candidate };
    return this.publishNotice(this.options.topics.candidateRelease(), release);
  }

  /** Publishes `model` fleet-wide: chunks, then the release notice. */
  async publishStable(model: StoredModel): Promise<number> {
    const encoded = await this.publishChunks(model);
    return this.publishNotice(this.options.topics.release(), encoded.release);
  }

  /** Clears the retained chunks of `model`. */
  async clearChunks(model: StoredModel): Promise<void> {
    const { topics, maxMessageBytes, publish } = this.options;
    const encoded = encodeRelease(model.manifest, model.onnx, maxMessageBytes);
    const empty = new Uint8Array(0);
    for (let index = 0; index < encoded.chunks.length; index++) {
      await publish(topics.releaseChunk(model.manifest.version, index), empty);
    }
  }

  private async publishNotice(
    topic: string,
    release: ModelRelease,
  ): Promise<number> {
    const { signer, maxMessageBytes, publish } = this.options;
    if (signer === undefined) {
      await publish(topic, encodeModelRelease(release, maxMessageBytes));
      return 0;
    }
    const signed = signer.sign(release, maxMessageBytes);
    await publish(topic, signed.notice);
    return signed.releaseSequence;
  }
}
