import { InvalidArgumentError } from 'commander';

/**
 * Parses the value of `--live-view-port`: a TCP port, 0-65535, where 0
 * picks a free one. Throws InvalidArgumentError, which commander prints
 * with the option name.
 */
export function parseLiveViewPort(text: string): number {
  const value = text.trim() === '' ? Number.NaN : Number(text);
  if (!Number.isSafeInteger(value) || value < 0 || value > 65_535) {
    throw new InvalidArgumentError(
      `expected a TCP port 0-65535 (0 for any free port), got ${text}`,
    );
  }
  return value;
}
