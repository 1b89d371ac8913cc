// Script of the live view page. The server inlines it into page.html's
// empty <script> element, and the page's Content-Security-Policy admits
// it by its hash. It polls /api/fleet once a second and redraws the page.
'use strict';
(() => {
  const POLL_MS = 1000;
  const REQUEST_TIMEOUT_MS = 3000;
  const SVG = 'http://www.w3.org/2000/svg';
  const ACCURACY_COLOR = '#1f77b4';
  const LOSS_COLOR = '#d62728';
  const byId = (id) => document.getElementById(id);

  function formatBytes(bytes) {
    if (bytes === null || bytes === undefined) return '-';
    if (bytes < 1024) return `${Math.round(bytes)} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(2)} MiB`;
  }

  function formatNumber(value, digits) {
    return value === null || value === undefined ? '-' : value.toFixed(digits);
  }

  /** Replaces the rows of `tbody`, setting cells as text, never as HTML. */
  function fillRows(tbody, rows, numericColumns) {
    tbody.replaceChildren(
      ...rows.map(({ cells, className }) => {
        const tr = document.createElement('tr');
        if (className) tr.className = className;
        cells.forEach((text, index) => {
          const td = document.createElement('td');
          td.textContent = String(text);
          if (numericColumns.includes(index)) td.className = 'number';
          tr.append(td);
        });
        return tr;
      }),
    );
  }

  function renderRound(fleet) {
    const round = fleet.round;
    byId('round-number').textContent = String(round.round);
    byId('round-state').textContent = `(${round.state})`;
    const progress = byId('round-progress');
    if (round.state === 'waiting') {
      byId('round-detail').textContent = 'waiting for vehicles';
      progress.max = 1;
      progress.value = 0;
      byId('round-progress-text').textContent = '';
      return;
    }
    const remainingS = Math.max(0, (round.deadlineMs - Date.now()) / 1000);
    const parts = [
      `trains from version ${round.baseModelVersion}`,
      `${round.selected} selected`,
      `quorum ${round.quorum}`,
    ];
    if (round.state === 'open' && round.accepted >= round.selected) {
      parts.push('every selected vehicle answered, merging');
    } else if (round.state === 'open') {
      parts.push(`deadline in ${remainingS.toFixed(0)} s`);
    }
    if (round.securePhase !== null)
      parts.push(`secure phase ${round.securePhase}`);
    byId('round-detail').textContent = parts.join(', ');
    progress.max = Math.max(1, round.selected);
    progress.value = round.accepted;
    byId('round-progress-text').textContent =
      `${round.accepted} of ${round.selected} accepted, ${round.rejected} rejected`;
  }

  function renderVehicles(fleet) {
    byId('vehicles-online').textContent = String(fleet.vehiclesOnline);
    const versions = fleet.versions
      .map((entry) => `version ${entry.modelVersion}: ${entry.vehicles}`)
      .join(', ');
    const hidden = fleet.vehiclesTotal - fleet.vehicles.length;
    byId('versions').textContent =
      (versions === ''
        ? 'no vehicle online'
        : `online by version: ${versions}`) +
      (hidden > 0 ? `; ${hidden} more vehicles not listed` : '');
    fillRows(
      byId('vehicle-rows'),
      fleet.vehicles.map((vehicle) => ({
        className: vehicle.state === 'offline' ? 'offline' : '',
        cells: [
          vehicle.vehicleId,
          vehicle.state,
          vehicle.modelVersion,
          vehicle.backend || '-',
          vehicle.numExamples,
        ],
      })),
      [2, 4],
    );
  }

  function renderRounds(fleet) {
    const rows = [...fleet.rounds].reverse().map((round) => ({
      className: round.outcome === 'failed' ? 'rejected' : '',
      cells: [
        round.round,
        round.outcome === 'failed' ? `failed: ${round.reasonCode}` : 'closed',
        round.modelVersion,
        formatNumber(round.accuracy, 4),
        formatNumber(round.trainLoss, 4),
        round.accepted,
        round.rejected,
        formatBytes(round.uplinkBytes),
        formatBytes(round.meanUpdateBytes),
        `${(round.durationMs / 1000).toFixed(1)} s`,
      ],
    }));
    fillRows(byId('round-rows'), rows, [0, 2, 3, 4, 5, 6, 7, 8, 9]);
  }

  function renderUpdates(fleet) {
    const updates = fleet.updates;
    const mean =
      updates.received === 0 ? null : updates.totalBytes / updates.received;
    byId('update-summary').textContent =
      `${updates.received} received (${updates.accepted} accepted, ` +
      `${updates.rejected} rejected), mean ${formatBytes(mean)}, ` +
      `largest ${formatBytes(updates.received === 0 ? null : updates.maxBytes)}`;
    fillRows(
      byId('update-rows'),
      updates.recent.map((update) => ({
        className: update.accepted ? '' : 'rejected',
        cells: [
          update.vehicleId,
          update.round ?? '-',
          update.accepted ? 'accepted' : `rejected: ${update.reasonCode}`,
          formatBytes(update.bytes),
        ],
      })),
      [1, 3],
    );
  }

  function renderRollout(fleet) {
    const rollout = fleet.rollout;
    const box = byId('rollout');
    if (rollout === null || !Array.isArray(rollout.stages)) {
      box.textContent = 'no rollout in progress';
      return;
    }
    const stages = rollout.stages
      .map((stage, index) => {
        const label = `${stage.percent}%${stage.shadow ? ' shadow' : ''}`;
        return index === rollout.stageIndex ? `[${label}]` : label;
      })
      .join(' → ');
    const lines = [
      `rollout ${rollout.rolloutId}: version ${rollout.version} over ` +
        `stable ${rollout.stableVersion}, ${rollout.status}`,
      `stages ${stages}`,
    ];
    const evaluation = rollout.lastEvaluation;
    if (evaluation !== null) {
      lines.push(
        `last gate check: ${evaluation.decision} (${evaluation.reason}); ` +
          `${evaluation.reportedVehicles} of ${evaluation.required} ` +
          'required vehicles reported',
      );
      for (const [name, figures] of [
        ['candidate', evaluation.candidate],
        ['stable', evaluation.stable],
      ]) {
        if (figures === null) continue;
        const shown = Object.entries(figures)
          .map(([key, value]) =>
            value === null
              ? `${key} -`
              : `${key} ${Number.isInteger(value) ? value : value.toFixed(3)}`,
          )
          .join(', ');
        lines.push(`${name}: ${shown}`);
      }
      if (evaluation.failures.length > 0) {
        lines.push(`failing gates: ${evaluation.failures.join('; ')}`);
      }
    }
    box.replaceChildren(
      ...lines.map((line) => {
        const row = document.createElement('div');
        row.textContent = line;
        return row;
      }),
    );
  }

  function svgElement(name, attributes) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) {
      element.setAttribute(key, String(value));
    }
    return element;
  }

  function svgText(x, y, text, anchor, color) {
    const element = svgElement('text', {
      x,
      y,
      'text-anchor': anchor,
      'font-size': 11,
      fill: color || '#555',
    });
    element.textContent = text;
    return element;
  }

  /** Draws one series as a line with a dot at each round. */
  function drawSeries(chart, points, color) {
    if (points.length === 0) return;
    chart.append(
      svgElement('polyline', {
        points: points
          .map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`)
          .join(' '),
        fill: 'none',
        stroke: color,
        'stroke-width': 2.5,
        'stroke-linejoin': 'round',
        'data-series': color,
      }),
    );
    for (const [x, y] of points) {
      chart.append(svgElement('circle', { cx: x, cy: y, r: 3.5, fill: color }));
    }
  }

  /** Draws accuracy (left axis, 0-1) and loss (right axis) per round. */
  function renderChart(fleet) {
    const chart = byId('chart');
    const width = 640;
    const height = 260;
    const left = 48;
    const right = 52;
    const top = 12;
    const bottom = 32;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    chart.replaceChildren();
    chart.append(
      svgElement('rect', {
        x: left,
        y: top,
        width: plotWidth,
        height: plotHeight,
        fill: 'none',
        stroke: '#ccc',
      }),
    );

    const rounds = fleet.rounds;
    if (rounds.length === 0) {
      chart.append(
        svgText(
          left + plotWidth / 2,
          top + plotHeight / 2,
          'no finished round yet',
          'middle',
        ),
      );
      return;
    }
    const first = rounds[0].round;
    const last = rounds[rounds.length - 1].round;
    const xOf = (round) =>
      last === first
        ? left + plotWidth / 2
        : left + ((round - first) / (last - first)) * plotWidth;
    const losses = rounds.map((r) => r.trainLoss).filter((v) => v !== null);
    const maxLoss = losses.length === 0 ? 1 : Math.max(...losses) * 1.1 || 1;

    for (let i = 0; i <= 4; i++) {
      const y = top + plotHeight - (i / 4) * plotHeight;
      chart.append(
        svgElement('line', {
          x1: left,
          x2: left + plotWidth,
          y1: y,
          y2: y,
          stroke: '#eee',
        }),
      );
      chart.append(
        svgText(left - 6, y + 4, (i / 4).toFixed(2), 'end', ACCURACY_COLOR),
      );
      chart.append(
        svgText(
          left + plotWidth + 6,
          y + 4,
          ((i / 4) * maxLoss).toPrecision(3),
          'start',
          LOSS_COLOR,
        ),
      );
    }
    chart.append(svgText(left, height - 10, `round ${first}`, 'start'));
    if (last !== first) {
      chart.append(
        svgText(left + plotWidth, height - 10, `round ${last}`, 'end'),
      );
    }

    const accuracy = rounds
      .filter((r) => r.accuracy !== null)
      .map((r) => [xOf(r.round), top + plotHeight - r.accuracy * plotHeight]);
    const loss = rounds
      .filter((r) => r.trainLoss !== null)
      .map((r) => [
        xOf(r.round),
        top + plotHeight - (r.trainLoss / maxLoss) * plotHeight,
      ]);
    drawSeries(chart, accuracy, ACCURACY_COLOR);
    drawSeries(chart, loss, LOSS_COLOR);
  }

  function render(fleet) {
    byId('fleet-id').textContent = fleet.fleetId;
    byId('model-version').textContent = String(fleet.modelVersion);
    renderRound(fleet);
    renderVehicles(fleet);
    renderRounds(fleet);
    renderUpdates(fleet);
    renderRollout(fleet);
    renderChart(fleet);
  }

  async function poll() {
    const connection = byId('connection');
    try {
      const response = await fetch('api/fleet', {
        cache: 'no-store',
        signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      connection.className = 'muted';
      connection.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      connection.className = 'error';
      connection.textContent = `aggregator not reachable (${err.message}); retrying`;
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
