/**
 * The start check that the depot's two URLs name two brokers. The options
 * reject equal URL text. This check also catches one broker under two
 * host names, such as `127.0.0.1` and `localhost`, by comparing the
 * addresses the names resolve to.
 */
import { lookup } from 'node:dns/promises';
import { isIPv4 } from 'node:net';
import { ErrorCode, FleetError, type Logger } from '../../protocol/index.ts';

/** Resolves a host name to every address it has. */
export type HostLookup = (hostname: string) => Promise<string[]>;

/**
 * Resolves `hostname` with node:dns `lookup`, which uses the system
 * resolver (getaddrinfo), so hosts file entries count as well as DNS.
 */
export async function lookupAddresses(hostname: string): Promise<string[]> {
  const found = await lookup(hostname, { all: true });
  return found.map((entry) => entry.address);
}

/**
 * Returns the host and port of a plain MQTT URL, with 1883 as the default port.
 */
function endpointOf(url: string): { hostname: string; port: string } {
  const parsed = new URL(url);
  // URL keeps the brackets of an IPv6 literal, but lookup expects it bare.
  const hostname = parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  return { hostname, port: parsed.port === '' ? '1883' : parsed.port };
}

/**
 * Lowercases `address`, and writes an IPv4-mapped IPv6 address as its IPv4
 * address.
 */
function normalizeAddress(address: string): string {
  const lower = address.toLowerCase();
  const mapped = lower.startsWith('::ffff:') ? lower.slice(7) : undefined;
  return mapped !== undefined && isIPv4(mapped) ? mapped : lower;
}

/**
 * Rejects two URLs that reach one broker: the same port and a host
 * address in common, because the depot would copy its own copies back and
 * forth between its two connections. When a host name does not resolve, the
 * check is skipped with a warning, because the depot retries a broker it
 * cannot reach yet, and RelayEchoFilter still stops such a loop.
 *
 * @throws {FleetError} INVALID_CONFIG naming both URLs and the address
 *   they share.
 */
export async function assertDistinctBrokers(
  upstreamUrl: string,
  downstreamUrl: string,
  log: Logger,
  lookupHost: HostLookup = lookupAddresses,
): Promise<void> {
  const upstream = endpointOf(upstreamUrl);
  const downstream = endpointOf(downstreamUrl);
  if (upstream.port !== downstream.port) return;

  let upstreamAddresses: string[];
  let downstreamAddresses: string[];
  try {
    [upstreamAddresses, downstreamAddresses] = await Promise.all([
      lookupHost(upstream.hostname),
      lookupHost(downstream.hostname),
    ]);
  } catch (err) {
    log.warn(
      { err, upstreamUrl, downstreamUrl },
      'broker host not resolved, same-broker check skipped',
    );
    return;
  }

  const upstreamSet = new Set(upstreamAddresses.map(normalizeAddress));
  const shared = downstreamAddresses
    .map(normalizeAddress)
    .find((address) => upstreamSet.has(address));
  if (shared === undefined) return;
  throw new FleetError(
    ErrorCode.InvalidConfig,
    `depot option downstreamUrl ${downstreamUrl} reaches the same broker as ` +
      `upstreamUrl ${upstreamUrl} (address ${shared}, port ` +
      `${upstream.port}); expected the depot's own broker, separate from ` +
      'the fleet broker',
  );
}
