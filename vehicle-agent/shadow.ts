/**
 * Shadow mode: a candidate model loaded beside the one in service. It
 * classifies the same frames, and only the agreement of the two and the
 * candidate's own figures are reported; its outputs never reach the
 * vehicle's decisions. It has its own downloader (and download folder),
 * so a shadow download never cancels a release download.
 */
import { OnnxClassifier } from '../models/index.ts';
import type { Logger, ModelRelease } from '../protocol/index.ts';
import type { ReleaseDownloader } from './release-download.ts';
import type { ModelIdentity } from './reports.ts';

/** Folder of shadow downloads, below the agent's state directory. */
export const SHADOW_DIR = 'shadow';

interface LoadedShadow {
  model: ModelIdentity;
  classifier: OnnxClassifier;
  /** Calls in progress; the session closes once they end. */
  activeCalls: number;
  retired: boolean;
}

function keyOf(model: ModelIdentity): string {
  return `${model.version}:${model.sha256.toLowerCase()}`;
}

/** The candidate a vehicle runs in shadow mode, if any. */
export class ShadowModel {
  private loaded: LoadedShadow | undefined;
  /** Key of the release wanted; changes cancel a load in progress. */
  private wanted: string | undefined;
  private chain: Promise<void> = Promise.resolve();

  constructor(
    private readonly downloads: ReleaseDownloader,
    private readonly log: Logger,
  ) {}

  /** The shadow model's identity, undefined when none is loaded. */
  get model(): ModelIdentity | undefined {
    return this.loaded?.model;
  }

  /**
   * Downloads and loads `release` as the shadow model, or unloads the
   * shadow model when `release` is undefined. Later calls supersede
   * earlier ones. Failures are logged, and the vehicle runs without a
   * shadow model.
   */
  set(release: ModelRelease | undefined): Promise<void> {
    const key = release === undefined ? undefined : keyOf(release);
    if (key === this.wanted) return this.chain;
    this.wanted = key;
    this.chain = this.chain
      .then(() => this.switchTo(release, key))
      .catch((err: unknown) => {
        this.log.warn(
          { err, modelVersion: release?.version },
          'shadow model not loaded',
        );
      });
    return this.chain;
  }

  private async switchTo(
    release: ModelRelease | undefined,
    key: string | undefined,
  ): Promise<void> {
    if (this.loaded !== undefined && keyOf(this.loaded.model) === key) return;
    await this.unload();
    if (release === undefined) {
      this.downloads.discardAll();
      return;
    }
    const onnx = await this.downloads.fetch(release);
    if (onnx === undefined || this.wanted !== key) return;
    await this.downloads.remove(release);
    const classifier = await OnnxClassifier.create(onnx);
    const model = { version: release.version, sha256: release.sha256 };
    this.loaded = { model, classifier, activeCalls: 0, retired: false };
    this.log.info({ modelVersion: release.version }, 'shadow model loaded');
  }

  /**
   * Classifies with the shadow model; returns undefined when none is
   * loaded.
   */
  async predict(
    images: Float32Array,
    count: number,
  ): Promise<
    { model: ModelIdentity; probabilities: Float32Array } | undefined
  > {
    const shadow = this.loaded;
    if (shadow === undefined) return undefined;
    shadow.activeCalls += 1;
    try {
      const probabilities = await shadow.classifier.predict(images, count);
      return { model: shadow.model, probabilities };
    } finally {
      shadow.activeCalls -= 1;
      if (shadow.retired && shadow.activeCalls === 0) {
        await shadow.classifier.close();
      }
    }
  }

  /** Hands a chunk to the shadow download. */
  handleChunk(version: number, index: number, payload: Uint8Array): void {
    this.downloads.handleChunk(version, index, payload);
  }

  /** Requests missing shadow chunks again after a (re)connection. */
  onConnected(): void {
    this.downloads.onConnected();
  }

  /** Stops downloading and closes the shadow session. */
  async close(): Promise<void> {
    this.wanted = undefined;
    this.downloads.stop();
    await this.chain;
    await this.unload();
  }

  private async unload(): Promise<void> {
    const shadow = this.loaded;
    if (shadow === undefined) return;
    this.loaded = undefined;
    shadow.retired = true;
    if (shadow.activeCalls === 0) await shadow.classifier.close();
    this.log.info(
      { modelVersion: shadow.model.version },
      'shadow model unloaded',
    );
  }
}
