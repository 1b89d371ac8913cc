import assert from 'node:assert/strict';
import { existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { request } from 'node:http';
import { after, before, describe, test } from 'node:test';
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { chromium, type Browser, type Page } from 'playwright-core';
import sharp from 'sharp';
import { InvalidArgumentError } from 'commander';
import {
  Aggregator,
  parseLiveViewPort,
  type FleetSnapshot,
  type RoundClosedEvent,
} from '../aggregator/index.ts';
import {
  AckStatus,
  ErrorCode,
  FleetError,
  VehicleState,
  encodeModelUpdate,
  encodeVehicleStatus,
} from '../protocol/index.ts';
import { MODEL_NAME } from '../models/architecture.ts';
import type { RunningBroker } from '../broker/index.ts';
import {
  FLEET_ID,
  TestVehicle,
  buildUpdate,
  createWorkspace,
  loadRealImages,
  startTestBroker,
  testOptions,
  topics,
  type RealImages,
  type Workspace,
} from './aggregator-fixtures.ts';
import {
  parsePrometheusText,
  type Family,
  type Sample,
} from './support/prometheus-text.ts';

/** Debian's chromium; FLEETLEARN_CHROMIUM names another binary. */
const CHROMIUM_PATH = process.env.FLEETLEARN_CHROMIUM ?? '/usr/bin/chromium';
const HAS_CHROMIUM = existsSync(CHROMIUM_PATH);
const NO_CHROMIUM = `no Chromium at ${CHROMIUM_PATH} (Debian package chromium)`;
const WAIT_MS = 15_000;
/** Line colours of page.html's chart, as RGB. */
const ACCURACY_RGB = [0x1f, 0x77, 0xb4];
const LOSS_RGB = [0xd6, 0x27, 0x28];
/** Pixels of a line colour a drawn two-round series has at least. */
const MIN_LINE_PIXELS = 500;

/** Per-vehicle loss and example count of each round. */
const PLANS = [
  [
    { trainLoss: 1, numExamples: 10 },
    { trainLoss: 2, numExamples: 20 },
    { trainLoss: 4, numExamples: 30 },
  ],
  [
    { trainLoss: 0.5, numExamples: 10 },
    { trainLoss: 1, numExamples: 20 },
    { trainLoss: 2, numExamples: 30 },
  ],
];
/** numExamples-weighted mean loss of each plan, worked out by hand. */
const EXPECTED_LOSSES = [170 / 60, 85 / 60];

interface HttpResult {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** Sends one request to the live view, with a time limit. */
function httpRequest(
  url: string,
  options: { method?: string; headers?: Record<string, string> } = {},
): Promise<HttpResult> {
  return new Promise((resolve, reject) => {
    const req = request(
      url,
      { method: options.method ?? 'GET', headers: options.headers },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (chunk: Buffer) => chunks.push(chunk));
        res.on('end', () =>
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            body: Buffer.concat(chunks).toString('utf8'),
          }),
        );
        res.on('error', reject);
      },
    );
    req.setTimeout(5000, () => req.destroy(new Error(`${url} timed out`)));
    req.on('error', reject);
    req.end();
  });
}

/** Resolves with the next `event` of `aggregator`, or rejects after ms. */
function nextEvent<T>(
  aggregator: Aggregator,
  event: 'round-closed',
  ms = WAIT_MS,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      aggregator.off(event, onEvent);
      reject(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const onEvent = (value: unknown): void => {
      clearTimeout(timer);
      resolve(value as T);
    };
    aggregator.once(event, onEvent);
  });
}

/** Counts pixels of `png` within 60 per channel of `rgb`. */
async function countPixels(png: Buffer, rgb: number[]): Promise<number> {
  const { data, info } = await sharp(png)
    .raw()
    .toBuffer({ resolveWithObject: true });
  let count = 0;
  for (let i = 0; i < data.length; i += info.channels) {
    const isClose = rgb.every((value, c) => Math.abs(data[i + c] - value) < 60);
    if (isClose) count += 1;
  }
  return count;
}

function family(families: Family[], name: string): Family {
  const found = families.find((candidate) => candidate.name === name);
  assert.ok(found, `metric ${name} missing`);
  return found;
}

/** Value of the single series of a counter or gauge. */
function valueOf(families: Family[], name: string): number {
  const samples = family(families, name).samples;
  assert.equal(samples.length, 1, `${name} has ${samples.length} series`);
  return samples[0].value;
}

/** Finds the sample `name` + `suffix` of a histogram with `labels`. */
function histogramSample(
  histogram: Family,
  suffix: string,
  labels: Record<string, string>,
): Sample {
  const found = histogram.samples.find(
    (sample) =>
      sample.name === histogram.name + suffix &&
      Object.entries(labels).every(
        ([key, value]) => sample.labels[key] === value,
      ),
  );
  assert.ok(found, `${histogram.name}${suffix} ${JSON.stringify(labels)}`);
  return found;
}

describe('live view', () => {
  let images: RealImages;
  let broker: RunningBroker;
  let workspace: Workspace;
  let vehicles: TestVehicle[] = [];
  let aggregator: Aggregator;
  let baseUrl = '';
  let browser: Browser | undefined;
  let page: Page | undefined;
  const closedEvents: RoundClosedEvent[] = [];
  const sentBytes: number[] = [];
  let rejectedCode = '';
  const requestedUrls: string[] = [];
  const consoleErrors: string[] = [];

  before(async () => {
    images = await loadRealImages();
    broker = await startTestBroker();
    workspace = createWorkspace();
    vehicles = await Promise.all(
      ['veh-a', 'veh-b', 'veh-c'].map((id) => TestVehicle.connect(broker, id)),
    );
    aggregator = new Aggregator(
      testOptions(broker, workspace, images, {
        minVehiclesOnline: 3,
        minUpdates: 3,
        maxRounds: 2,
        roundTimeoutMs: 30_000,
        testSet: images.testSet,
        liveViewPort: 0,
      }),
    );
    await aggregator.start();
    baseUrl = aggregator.liveViewUrl!;
    if (HAS_CHROMIUM) {
      browser = await chromium.launch({
        executablePath: CHROMIUM_PATH,
        headless: true,
        // Chromium's sandbox cannot start as root, which CI runs as.
        args: process.getuid?.() === 0 ? ['--no-sandbox'] : [],
        timeout: WAIT_MS,
      });
      page = await browser.newPage({ viewport: { width: 1000, height: 1400 } });
      page.on('request', (req) => requestedUrls.push(req.url()));
      page.on('console', (message) => {
        if (message.type() === 'error') consoleErrors.push(message.text());
      });
    }
  });

  after(async () => {
    await browser?.close();
    await aggregator?.stop();
    await Promise.all(vehicles.map((vehicle) => vehicle.close()));
    await broker?.close();
    workspace?.remove();
  });

  /** Sends one round of updates per PLANS[index] and waits for its close. */
  async function runRound(index: number): Promise<void> {
    const tasks = await Promise.all(vehicles.map((v) => v.nextTask()));
    const task = tasks[0];
    assert.equal(task.round, index + 1);
    const closed = nextEvent<RoundClosedEvent>(aggregator, 'round-closed');
    if (index === 0) {
      const bad = encodeModelUpdate(
        buildUpdate('veh-a', task, {
          overrides: { round: 99, updateId: 'veh-a-bad' },
        }),
      );
      sentBytes.push(bad.byteLength);
      const ack = await vehicles[0].send(bad);
      assert.equal(ack.status, AckStatus.Rejected);
      rejectedCode = ack.reasonCode;
    }
    const acks = await Promise.all(
      vehicles.map((vehicle, k) => {
        const plan = PLANS[index][k];
        const update = buildUpdate(vehicle.id, task, {
          numExamples: plan.numExamples,
        });
        update.metrics = { ...update.metrics, trainLoss: plan.trainLoss };
        const payload = encodeModelUpdate(update);
        sentBytes.push(payload.byteLength);
        return vehicle.send(payload);
      }),
    );
    for (const ack of acks) assert.equal(ack.status, AckStatus.Accepted);
    closedEvents.push(await closed);
  }

  /** Publishes a retained status for `vehicle`. */
  async function publishStatus(
    vehicle: TestVehicle,
    state: number,
    modelVersion: number,
  ): Promise<void> {
    const status = encodeVehicleStatus({
      vehicleId: vehicle.id,
      state,
      modelName: MODEL_NAME,
      modelVersion,
      numExamples: 100,
      updatedAtMs: Date.now(),
      connectionId: 0,
      backend: 'test',
    });
    await vehicle.client.publishAsync(
      topics.status(vehicle.id),
      Buffer.from(status),
      { qos: 1, retain: true },
    );
  }

  /** Polls /api/fleet until `isReady` holds, at most WAIT_MS. */
  async function fleetWhen(
    isReady: (fleet: FleetSnapshot) => boolean,
  ): Promise<FleetSnapshot> {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      const fleet = JSON.parse(
        (await httpRequest(`${baseUrl}api/fleet`)).body,
      ) as FleetSnapshot;
      if (isReady(fleet)) return fleet;
      if (Date.now() > deadline) {
        assert.fail(`fleet not as expected: ${JSON.stringify(fleet)}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  test('url on loopback', () => {
    assert.match(baseUrl, /^http:\/\/127\.0\.0\.1:\d+\/$/);
  });

  test('metrics before the first round closes', async () => {
    await fleetWhen((fleet) => fleet.round.state === 'open');
    const response = await httpRequest(`${baseUrl}metrics`);

    const families = parsePrometheusText(response.body);
    const names = families.map((metric) => metric.name);
    assert.equal(valueOf(families, 'fleetlearn_rounds_closed_total'), 0);
    assert.equal(valueOf(families, 'fleetlearn_vehicles_online'), 3);
    assert.equal(valueOf(families, 'fleetlearn_current_round'), 1);
    // Absent, not 0, until a round has produced a value.
    assert.ok(!names.includes('fleetlearn_last_accuracy'));
    assert.ok(!names.includes('fleetlearn_last_train_loss'));
  });

  test(
    'page shows the open round',
    { skip: !HAS_CHROMIUM && NO_CHROMIUM },
    async () => {
      await page!.goto(baseUrl, { timeout: WAIT_MS });
      await page!.waitForFunction(
        () => document.getElementById('round-state')?.textContent === '(open)',
        undefined,
        { timeout: WAIT_MS },
      );
      const chart = await page!.locator('#chart').screenshot();

      assert.equal(await page!.textContent('#round-number'), '1');
      assert.equal(await page!.textContent('#vehicles-online'), '3');
      assert.equal(await page!.textContent('#fleet-id'), FLEET_ID);
      assert.equal(
        await page!.textContent('#rollout'),
        'no rollout in progress',
      );
      // No round has finished, so neither line is drawn yet.
      assert.ok((await countPixels(chart, ACCURACY_RGB)) < 20);
      assert.ok((await countPixels(chart, LOSS_RGB)) < 20);
    },
  );

  test('api reports rounds and vehicles', async () => {
    await runRound(0);
    await publishStatus(vehicles[0], VehicleState.Online, 1);
    await runRound(1);
    await fleetWhen((fleet) => fleet.vehicles[0]?.modelVersion === 1);
    await publishStatus(vehicles[2], VehicleState.Offline, 0);

    const fleet = await fleetWhen((f) => f.vehiclesOnline === 2);

    assert.equal(fleet.fleetId, FLEET_ID);
    assert.equal(fleet.modelVersion, 2);
    assert.equal(fleet.round.round, 2);
    assert.equal(fleet.round.state, 'closed');
    assert.equal(fleet.round.accepted, 3);
    assert.equal(fleet.round.quorum, 3);
    assert.deepEqual(
      fleet.vehicles.map((v) => [v.vehicleId, v.state, v.modelVersion]),
      [
        ['veh-a', 'online', 1],
        ['veh-b', 'online', 0],
        ['veh-c', 'offline', 0],
      ],
    );
    assert.deepEqual(fleet.versions, [
      { modelVersion: 1, vehicles: 1 },
      { modelVersion: 0, vehicles: 1 },
    ]);
    assert.deepEqual(
      fleet.rounds.map((r) => [r.round, r.outcome, r.modelVersion]),
      [
        [1, 'closed', 1],
        [2, 'closed', 2],
      ],
    );
    for (const [i, row] of fleet.rounds.entries()) {
      assert.equal(row.accuracy, closedEvents[i].accuracy);
      assert.equal(typeof row.accuracy, 'number');
      assert.ok(Math.abs(row.trainLoss! - EXPECTED_LOSSES[i]) < 1e-9);
      assert.equal(row.uplinkBytes, closedEvents[i].uplinkBytes);
    }
    assert.equal(fleet.rounds[0].rejected, 1);
    assert.deepEqual(fleet.rounds[0].rejectedByReason, { [rejectedCode]: 1 });
    assert.equal(fleet.updates.received, 7);
    assert.equal(fleet.updates.rejected, 1);
    assert.equal(
      fleet.updates.totalBytes,
      sentBytes.reduce((a, b) => a + b, 0),
    );
    assert.equal(fleet.lastRelease?.modelVersion, 2);
    assert.equal(fleet.rollout, null);
  });

  test('metrics parse and match', async () => {
    const response = await httpRequest(`${baseUrl}metrics`);
    assert.equal(response.status, 200);
    assert.match(String(response.headers['content-type']), /^text\/plain/);

    // The package checks every line's syntax on its own; the strict
    // parser reads the values, labelled histograms included.
    assert.doesNotThrow(() => parsePrometheusTextFormat(response.body));
    const families = parsePrometheusText(response.body);

    for (const { name, samples } of families) {
      for (const sample of samples) {
        assert.equal(sample.labels.fleet, FLEET_ID, `${name} fleet label`);
      }
    }
    const totalBytes = sentBytes.reduce((a, b) => a + b, 0);
    assert.equal(valueOf(families, 'fleetlearn_rounds_closed_total'), 2);
    assert.deepEqual(
      family(families, 'fleetlearn_rounds_failed_total').samples,
      [],
    );
    assert.equal(valueOf(families, 'fleetlearn_updates_accepted_total'), 6);
    const rejected = family(families, 'fleetlearn_updates_rejected_total');
    assert.deepEqual(
      rejected.samples.map((s) => [s.labels.reason, s.value]),
      [[rejectedCode, 1]],
    );
    const bytes = family(families, 'fleetlearn_update_bytes');
    assert.equal(bytes.type, 'histogram');
    assert.equal(histogramSample(bytes, '_count', {}).value, sentBytes.length);
    assert.equal(histogramSample(bytes, '_sum', {}).value, totalBytes);
    const smallest = Math.min(...sentBytes);
    const underSmallest = bytes.samples.filter(
      (s) => s.name.endsWith('_bucket') && Number(s.labels.le) < smallest,
    );
    for (const bucket of underSmallest) assert.equal(bucket.value, 0);
    assert.equal(valueOf(families, 'fleetlearn_vehicles_online'), 2);
    assert.equal(valueOf(families, 'fleetlearn_current_round'), 2);
    assert.equal(valueOf(families, 'fleetlearn_model_version'), 2);
    assert.equal(
      valueOf(families, 'fleetlearn_last_accuracy'),
      closedEvents[1].accuracy,
    );
    const lastLoss = valueOf(families, 'fleetlearn_last_train_loss');
    assert.ok(Math.abs(lastLoss - EXPECTED_LOSSES[1]) < 1e-9);
    const durations = family(families, 'fleetlearn_round_duration_seconds');
    const closedCount = histogramSample(durations, '_count', {
      outcome: 'closed',
    });
    assert.equal(closedCount.value, 2);
    const closedSeconds = histogramSample(durations, '_sum', {
      outcome: 'closed',
    }).value;
    const eventSeconds =
      (closedEvents[0].durationMs + closedEvents[1].durationMs) / 1000;
    assert.ok(Math.abs(closedSeconds - eventSeconds) < 1e-6);
    // Version 0 at start, then one release per closed round.
    assert.equal(valueOf(families, 'fleetlearn_releases_published_total'), 3);
  });

  test('strict parser rejects bad text', () => {
    const bad = [
      'no_type_line 1\n',
      '# TYPE a counter\na{l="x} 1\n',
      '# TYPE a counter\na{l="\\q"} 1\n',
      '# TYPE a counter\na one\n',
      '# TYPE a counter\na 1\na 2\n',
      '# TYPE a counter\nb 1\n',
      '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_count 1\n',
      '# TYPE h histogram\nh_bucket{le="1"} 1\nh_count 1\n',
      '# TYPE a gauge\na 1',
    ];
    for (const text of bad) {
      assert.throws(() => parsePrometheusText(text), SyntaxError, text);
    }
    const good = '# HELP a x\n# TYPE a gauge\na{l="q\\"\\n"} NaN 17\n';
    assert.deepEqual(parsePrometheusText(good)[0].samples, [
      { name: 'a', labels: { l: 'q"\n' }, value: Number.NaN },
    ]);
  });

  test(
    'page draws the chart',
    { skip: !HAS_CHROMIUM && NO_CHROMIUM },
    async () => {
      await page!.waitForFunction(
        () =>
          document.getElementById('round-number')?.textContent === '2' &&
          document.getElementById('round-state')?.textContent === '(closed)' &&
          document.getElementById('vehicles-online')?.textContent === '2',
        undefined,
        { timeout: WAIT_MS },
      );
      const chart = await page!.locator('#chart').screenshot();

      assert.equal(await page!.textContent('#model-version'), '2');
      assert.equal(
        await page!.textContent('#versions'),
        'online by version: version 1: 1, version 0: 1',
      );
      const rows = await page!.locator('#vehicle-rows tr').allTextContents();
      assert.equal(rows.length, 3);
      assert.match(rows[2], /veh-c\s*offline/);
      assert.equal(await page!.locator('#round-rows tr').count(), 2);
      const accuracyPixels = await countPixels(chart, ACCURACY_RGB);
      const lossPixels = await countPixels(chart, LOSS_RGB);
      assert.ok(
        accuracyPixels >= MIN_LINE_PIXELS,
        `accuracy line has ${accuracyPixels} pixels`,
      );
      assert.ok(
        lossPixels >= MIN_LINE_PIXELS,
        `loss line has ${lossPixels} pixels`,
      );
      const origin = new URL(baseUrl).origin;
      const foreign = requestedUrls.filter((url) => !url.startsWith(origin));
      assert.deepEqual(foreign, []);
      assert.deepEqual(consoleErrors, []);
    },
  );

  test('rollout state shown', async () => {
    const dir = join(workspace.dir, 'state', 'rollout');
    mkdirSync(dir, { recursive: true });
    const file = join(dir, 'rollout.json');
    writeFileSync(
      file,
      JSON.stringify({
        rolloutId: 'r-test',
        version: 2,
        stableVersion: 1,
        status: 'active',
        stageIndex: 1,
        stages: [
          { percent: 10, shadow: false },
          { percent: 50, shadow: false },
          { percent: 100, shadow: false },
        ],
        stageStartedAtMs: 1,
        cohortTags: { region: 'eu' },
        vehicleIds: [],
        lastEvaluation: {
          atMs: 2,
          stage: 1,
          decision: 'wait',
          reason: 'too few reports',
          reportedVehicles: 1,
          required: 2,
          cohortVehicles: 3,
          failures: [],
          candidate: { vehicles: 1, accuracy: 0.9, p95Ms: 3.5 },
          stable: null,
        },
      }),
    );
    try {
      const fleet = await fleetWhen((f) => f.rollout !== null);
      assert.equal(fleet.rollout?.rolloutId, 'r-test');
      assert.equal(fleet.rollout?.stageIndex, 1);
      assert.deepEqual(
        fleet.rollout?.stages.map((stage) => stage.percent),
        [10, 50, 100],
      );
      assert.equal(fleet.rollout?.lastEvaluation?.decision, 'wait');
      assert.equal(fleet.rollout?.lastEvaluation?.candidate?.accuracy, 0.9);
      if (page !== undefined) {
        await page.waitForFunction(
          () =>
            document
              .getElementById('rollout')
              ?.textContent?.includes('version 2 over stable 1') === true,
          undefined,
          { timeout: WAIT_MS },
        );
        const text = await page.textContent('#rollout');
        assert.match(text ?? '', /10% → \[50%\] → 100%/);
      }

      // A damaged file shows no rollout and breaks nothing.
      writeFileSync(file, '{"stages": ');
      const damaged = await fleetWhen((f) => f.rollout === null);
      assert.equal(damaged.rollout, null);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('unknown path gets 404', async () => {
    const response = await httpRequest(`${baseUrl}api/nothing`);

    assert.equal(response.status, 404);
    assert.match(response.body, /no page at \/api\/nothing/);
  });

  test('post gets 405 with allow', async () => {
    for (const path of ['', 'api/fleet', 'metrics']) {
      const response = await httpRequest(`${baseUrl}${path}`, {
        method: 'POST',
      });

      assert.equal(response.status, 405, path);
      assert.equal(response.headers.allow, 'GET, HEAD');
      assert.match(response.body, /method POST is not allowed/);
    }
  });

  test('invalid target gets 400', async () => {
    const response = await httpRequest(`${baseUrl.slice(0, -1)}//[`);

    assert.equal(response.status, 400);
    assert.match(response.body, /invalid request target "\/\/\["/);
  });

  test('head has no body', async () => {
    const response = await httpRequest(`${baseUrl}api/fleet`, {
      method: 'HEAD',
    });

    assert.equal(response.status, 200);
    assert.equal(response.body, '');
    assert.ok(Number(response.headers['content-length']) > 0);
  });

  test('foreign host header gets 403', async () => {
    const response = await httpRequest(`${baseUrl}api/fleet`, {
      headers: { host: 'attacker.example:80' },
    });

    assert.equal(response.status, 403);
    assert.match(response.body, /host "attacker.example" is not served/);
  });

  test('page sets a strict csp', async () => {
    const response = await httpRequest(baseUrl);

    assert.equal(response.status, 200);
    const csp = String(response.headers['content-security-policy']);
    assert.match(csp, /default-src 'none'/);
    assert.match(csp, /script-src 'sha256-/);
  });

  test('port in use rejected', async () => {
    const other = createWorkspace();
    const port = Number(new URL(baseUrl).port);
    const second = new Aggregator(
      testOptions(broker, other, images, { liveViewPort: port }),
    );
    try {
      await assert.rejects(second.start(), (err: unknown) => {
        assert.ok(err instanceof FleetError);
        assert.equal(err.code, ErrorCode.InvalidConfig);
        assert.match(err.message, new RegExp(`port ${port} .* is in use`));
        return true;
      });
    } finally {
      await second.stop();
      other.remove();
    }
  });

  test('bad port option rejected', () => {
    for (const port of [-1, 65_536, 1.5]) {
      assert.throws(
        () =>
          new Aggregator(
            testOptions(broker, workspace, images, { liveViewPort: port }),
          ),
        (err: unknown) =>
          err instanceof FleetError && err.code === ErrorCode.InvalidConfig,
        String(port),
      );
    }
  });

  test('bad port flag rejected', () => {
    for (const text of ['', 'abc', '-1', '65536', '80.5']) {
      assert.throws(() => parseLiveViewPort(text), InvalidArgumentError, text);
    }
    assert.equal(parseLiveViewPort('0'), 0);
    assert.equal(parseLiveViewPort('9464'), 9464);
  });
});
