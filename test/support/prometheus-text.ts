/**
 * A strict parser of the Prometheus text exposition format 0.0.4, for
 * tests. The npm package parse-prometheus-text-format 1.1 checks each
 * line's syntax but drops the labels, count and sum of labelled
 * histograms, so values are read here. Besides the line grammar it checks
 * that every sample belongs to the family of the TYPE line before it, that
 * no series repeats, and that each histogram's buckets are cumulative and
 * end with a `+Inf` bucket equal to its `_count`.
 */

/** One sample line. */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** A metric family: its HELP and TYPE lines and its samples. */
export interface Family {
  name: string;
  help: string;
  type: 'counter' | 'gauge' | 'histogram' | 'summary' | 'untyped';
  samples: Sample[];
}

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const VALUE = /^(?:[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN)$/;
const TYPES = ['counter', 'gauge', 'histogram', 'summary', 'untyped'];
const SUFFIXES: Record<string, string[]> = {
  histogram: ['_bucket', '_sum', '_count'],
  summary: ['', '_sum', '_count'],
};

/**
 * Parses `text` into families.
 *
 * @throws {SyntaxError} naming the line number and what is wrong.
 */
export function parsePrometheusText(text: string): Family[] {
  if (!text.endsWith('\n')) throw new SyntaxError('text must end with \\n');
  const families = new Map<string, Family>();
  const seriesSeen = new Set<string>();
  let current: Family | undefined;
  const lines = text.slice(0, -1).split('\n');
  lines.forEach((line, index) => {
    const fail = (what: string): never => {
      throw new SyntaxError(
        `line ${index + 1} ${JSON.stringify(line)}: ${what}`,
      );
    };
    if (line.startsWith('# HELP ') || line.startsWith('# TYPE ')) {
      current = parseMetadata(line, families, current, fail);
      return;
    }
    if (line.startsWith('#') || line === '') return;
    const sample = parseSample(line, fail);
    if (current === undefined || !belongsTo(sample.name, current)) {
      fail(`sample outside the family ${current?.name ?? '(none)'}`);
    }
    const key = `${sample.name}${JSON.stringify(sortedLabels(sample.labels))}`;
    if (seriesSeen.has(key)) fail('series repeated');
    seriesSeen.add(key);
    current!.samples.push(sample);
  });
  for (const family of families.values()) {
    if (family.type === 'histogram') checkHistogram(family);
  }
  return [...families.values()];
}

function parseMetadata(
  line: string,
  families: Map<string, Family>,
  current: Family | undefined,
  fail: (what: string) => never,
): Family {
  const [, keyword, name, ...rest] = line.split(' ');
  const argument = rest.join(' ');
  if (!NAME.test(name ?? '')) fail('invalid metric name');
  let family = families.get(name);
  if (family !== undefined && family !== current) {
    fail('family split by another family');
  }
  if (family === undefined) {
    family = { name, help: '', type: 'untyped', samples: [] };
    families.set(name, family);
  }
  if (keyword === 'TYPE') {
    if (!TYPES.includes(argument)) fail(`unknown type ${argument}`);
    if (family.samples.length > 0) fail('TYPE after samples');
    family.type = argument as Family['type'];
  } else {
    family.help = argument.replace(/\\n/g, '\n').replace(/\\\\/g, '\\');
  }
  return family;
}

function parseSample(line: string, fail: (what: string) => never): Sample {
  const nameEnd = line.search(/[{ ]/);
  if (nameEnd <= 0) fail('no value');
  const name = line.slice(0, nameEnd);
  if (!NAME.test(name)) fail('invalid metric name');
  let position = nameEnd;
  const labels: Record<string, string> = {};
  if (line[position] === '{') {
    position = parseLabels(line, position + 1, labels, fail);
  }
  const fields = line.slice(position).trim().split(/ +/);
  if (line[position] !== ' ' || fields.length < 1 || fields.length > 2) {
    fail('expected " value [timestamp]" after the name and labels');
  }
  if (!VALUE.test(fields[0])) fail(`invalid value ${fields[0]}`);
  if (fields.length === 2 && !/^-?\d+$/.test(fields[1])) {
    fail(`invalid timestamp ${fields[1]}`);
  }
  const value = fields[0].endsWith('Inf')
    ? (fields[0].startsWith('-') ? -1 : 1) * Infinity
    : Number(fields[0]);
  return { name, labels, value };
}

/** Parses `name="value",...}` from `start`; returns the index after `}`. */
function parseLabels(
  line: string,
  start: number,
  labels: Record<string, string>,
  fail: (what: string) => never,
): number {
  let position = start;
  while (line[position] !== '}') {
    const equals = line.indexOf('=', position);
    const labelName = line.slice(position, equals);
    if (equals < 0 || !LABEL_NAME.test(labelName)) fail('invalid label name');
    if (labelName in labels) fail(`label ${labelName} repeated`);
    if (line[equals + 1] !== '"') fail('label value must be quoted');
    let value = '';
    position = equals + 2;
    for (; position < line.length && line[position] !== '"'; position++) {
      if (line[position] !== '\\') {
        value += line[position];
        continue;
      }
      const escaped = line[++position];
      if (escaped === 'n') value += '\n';
      else if (escaped === '\\' || escaped === '"') value += escaped;
      else fail(`invalid escape \\${escaped ?? ''}`);
    }
    if (position >= line.length) fail('unterminated label value');
    labels[labelName] = value;
    position += 1;
    if (line[position] === ',') position += 1;
    else if (line[position] !== '}') fail('expected , or } after a label');
  }
  return position + 1;
}

function belongsTo(sampleName: string, family: Family): boolean {
  const suffixes = SUFFIXES[family.type] ?? [''];
  return suffixes.some((suffix) => sampleName === family.name + suffix);
}

function sortedLabels(labels: Record<string, string>): [string, string][] {
  return Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : 1));
}

/** Checks cumulative buckets and +Inf = _count for each label set. */
function checkHistogram(family: Family): void {
  const groups = new Map<
    string,
    { buckets: [number, number][]; count?: number }
  >();
  for (const sample of family.samples) {
    const { le, ...rest } = sample.labels;
    const key = JSON.stringify(sortedLabels(rest));
    const group = groups.get(key) ?? { buckets: [] };
    groups.set(key, group);
    if (sample.name.endsWith('_bucket')) {
      if (le === undefined) {
        throw new SyntaxError(`${family.name}: bucket without le`);
      }
      const bound = le === '+Inf' ? Infinity : Number(le);
      group.buckets.push([bound, sample.value]);
    } else if (sample.name.endsWith('_count')) {
      group.count = sample.value;
    }
  }
  for (const [key, { buckets, count }] of groups) {
    const where = `${family.name}${key}`;
    for (let i = 1; i < buckets.length; i++) {
      const isOrdered =
        buckets[i][0] > buckets[i - 1][0] && buckets[i][1] >= buckets[i - 1][1];
      if (!isOrdered) throw new SyntaxError(`${where}: buckets not cumulative`);
    }
    const last = buckets[buckets.length - 1];
    if (last === undefined || last[0] !== Infinity || last[1] !== count) {
      throw new SyntaxError(`${where}: +Inf bucket missing or not _count`);
    }
  }
}
