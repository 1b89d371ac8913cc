import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { InvalidArgumentError } from 'commander';

import {
  parseFraction,
  parseIntegerAtLeast,
  parseNumberAtLeast,
  parsePositiveNumber,
  reportStartError,
} from '../protocol/cli-arguments.ts';
import { createLogger } from '../protocol/index.ts';

describe('command-line number parsers', () => {
  test('integer parser bounds', () => {
    const parse = parseIntegerAtLeast(1);

    assert.equal(parse('3'), 3);
    for (const bad of ['0', '-1', '1.5', 'many', '', ' ', '1e400']) {
      assert.throws(
        () => parse(bad),
        InvalidArgumentError,
        JSON.stringify(bad),
      );
    }
  });

  test('number parsers bounds', () => {
    assert.equal(parseNumberAtLeast(0)('0'), 0);
    assert.equal(parsePositiveNumber('0.001'), 0.001);
    assert.equal(parseFraction('0.5'), 0.5);

    assert.throws(() => parseNumberAtLeast(0)('-0.1'), InvalidArgumentError);
    assert.throws(() => parseNumberAtLeast(0)(''), InvalidArgumentError);
    assert.throws(() => parsePositiveNumber('0'), InvalidArgumentError);
    assert.throws(() => parsePositiveNumber('Infinity'), InvalidArgumentError);
    assert.throws(() => parseFraction('1'), InvalidArgumentError);
    assert.throws(() => parseFraction('0'), InvalidArgumentError);
  });
});

describe('start errors', () => {
  test('flag conflict is a user error', (t) => {
    const lines: string[] = [];
    t.mock.method(console, 'error', (line: string) => lines.push(line));
    const code = reportStartError(
      'aggregator',
      new InvalidArgumentError('--secagg-* options need --secure-aggregation'),
      createLogger({ level: 'silent' }),
      'invalid configuration',
    );
    assert.equal(code, 2);
    assert.deepEqual(lines, [
      'aggregator: --secagg-* options need --secure-aggregation',
    ]);
  });

  test('unexpected error exits 1', () => {
    const code = reportStartError(
      'aggregator',
      new Error('disk on fire'),
      createLogger({ level: 'silent' }),
      'start failed',
    );
    assert.equal(code, 1);
  });
});
