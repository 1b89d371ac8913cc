import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { InvalidArgumentError } from 'commander';

import {
  parseFraction,
  parseIntegerAtLeast,
  parseNumberAtLeast,
  parsePositiveNumber,
} from '../protocol/cli-arguments.ts';

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
