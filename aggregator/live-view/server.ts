/**
 * The live view's HTTP server on 127.0.0.1: the page at `/`, the JSON API
 * at `/api/fleet` and Prometheus metrics at `/metrics`. It only reads the
 * aggregator's state, so it serves GET and HEAD only.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import {
  createServer,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from 'node:http';
import type { AddressInfo } from 'node:net';
import { ErrorCode, FleetError, type Logger } from '../../protocol/index.ts';
import { FleetState } from './fleet-state.ts';
import { FleetMetrics } from './metrics.ts';
import type { LiveViewSource } from './source.ts';

/** The only address the live view listens on. */
export const LIVE_VIEW_HOST = '127.0.0.1';
/** Time `close()` lets open requests finish before cutting connections. */
const CLOSE_TIMEOUT_MS = 2000;
/** Limits on a slow client. The page's requests take milliseconds. */
const HEADERS_TIMEOUT_MS = 5000;
const REQUEST_TIMEOUT_MS = 10_000;
/** Host names a browser on this machine sends. Others are rejected. */
const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]']);
const ALLOWED_METHODS = 'GET, HEAD';

const PAGE_HTML = buildPage();

/**
 * Content-Security-Policy of the page: its one inline script and style
 * run by hash, and it may connect to this server only, so the page loads
 * nothing from the network.
 */
const PAGE_CSP = [
  "default-src 'none'",
  `script-src '${inlineHash(PAGE_HTML, 'script')}'`,
  `style-src '${inlineHash(PAGE_HTML, 'style')}'`,
  "connect-src 'self'",
  "img-src 'self' data:",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');

/** Options of {@link startLiveView}. */
export interface LiveViewOptions {
  /** TCP port on 127.0.0.1, where 0 picks a free one. */
  port: number;
  source: LiveViewSource;
  log: Logger;
}

/** A running live view, stopped by `close()`. */
export interface LiveView {
  /** Base URL, for example http://127.0.0.1:9464/. */
  readonly url: string;
  readonly port: number;
  close(): Promise<void>;
}

/**
 * Starts the live view and subscribes it to the source's events.
 *
 * @throws {RangeError} when `port` is not an integer in 0-65535.
 * @throws {FleetError} INVALID_CONFIG when the port is taken or cannot be
 *   bound, naming the port.
 */
export async function startLiveView(
  options: LiveViewOptions,
): Promise<LiveView> {
  const { port, source } = options;
  if (!Number.isSafeInteger(port) || port < 0 || port > 65_535) {
    throw new RangeError(
      `live view port is ${port}, expected an integer in 0-65535`,
    );
  }
  const log = options.log.child({ component: 'live-view' });
  const state = new FleetState(source, log);
  const metrics = new FleetMetrics(source, state);
  const server = createServer((request, response) => {
    handleRequest(request, response, { state, metrics, log }).catch(
      (err: unknown) => {
        log.error({ err, url: request.url }, 'live view request failed');
        if (!response.headersSent) {
          sendText(response, 500, 'internal error; see the aggregator log');
        } else {
          response.destroy();
        }
      },
    );
  });
  server.headersTimeout = HEADERS_TIMEOUT_MS;
  server.requestTimeout = REQUEST_TIMEOUT_MS;

  try {
    await listen(server, port);
  } catch (err) {
    state.detach();
    metrics.detach();
    throw err;
  }
  const boundPort = (server.address() as AddressInfo).port;
  const url = `http://${LIVE_VIEW_HOST}:${boundPort}/`;
  log.info({ url, port: boundPort }, 'live view started');

  let closing: Promise<void> | undefined;
  return {
    url,
    port: boundPort,
    close: () => {
      closing ??= (async () => {
        state.detach();
        metrics.detach();
        await closeServer(server);
        log.info({ url }, 'live view stopped');
      })();
      return closing;
    },
  };
}

function listen(server: Server, port: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException): void => {
      const hint =
        err.code === 'EADDRINUSE'
          ? 'is in use; choose another port, or 0 for any free one'
          : `cannot be bound (${err.code ?? err.message})`;
      reject(
        new FleetError(
          ErrorCode.InvalidConfig,
          `live view port ${port} on ${LIVE_VIEW_HOST} ${hint}`,
          { cause: err },
        ),
      );
    };
    server.once('error', onError);
    server.listen(port, LIVE_VIEW_HOST, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

/**
 * Stops accepting connections and waits for open requests, at most
 * CLOSE_TIMEOUT_MS. Then it cuts the connections still open, because a
 * browser's keep-alive connection would otherwise hold the server open.
 */
async function closeServer(server: Server): Promise<void> {
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeIdleConnections();
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<void>((resolve) => {
    timer = setTimeout(() => {
      server.closeAllConnections();
      resolve();
    }, CLOSE_TIMEOUT_MS);
  });
  await Promise.race([closed, timedOut]);
  clearTimeout(timer);
  await closed;
}

interface Handlers {
  state: FleetState;
  metrics: FleetMetrics;
  log: Logger;
}

async function handleRequest(
  request: IncomingMessage,
  response: ServerResponse,
  handlers: Handlers,
): Promise<void> {
  const method = request.method ?? '';
  const host = hostNameOf(request.headers.host);
  if (!LOOPBACK_HOSTS.has(host)) {
    // A page on another site can reach this port through a DNS name that
    // resolves to 127.0.0.1 (DNS rebinding). Its requests carry that name
    // as Host.
    handlers.log.warn({ host: host.slice(0, 100) }, 'live view host rejected');
    sendText(
      response,
      403,
      `host ${JSON.stringify(host.slice(0, 100))} is not served; open the ` +
        `live view through ${LIVE_VIEW_HOST} or localhost`,
    );
    return;
  }
  const path = pathOf(request.url ?? '/');
  if (path === undefined) {
    const target = (request.url ?? '').slice(0, 100);
    handlers.log.warn({ target }, 'live view request target invalid');
    sendText(response, 400, `invalid request target ${JSON.stringify(target)}`);
    return;
  }
  const route = ROUTES[path];
  if (route === undefined) {
    sendText(
      response,
      404,
      `no page at ${path}; the live view serves /, /api/fleet and /metrics`,
    );
    return;
  }
  if (method !== 'GET' && method !== 'HEAD') {
    response.setHeader('Allow', ALLOWED_METHODS);
    sendText(
      response,
      405,
      `method ${method} is not allowed on ${path}; the live view is read ` +
        `only, use ${ALLOWED_METHODS}`,
    );
    return;
  }
  const { contentType, body, headers } = await route(handlers);
  send(response, 200, contentType, body, headers);
}

type Route = (handlers: Handlers) => Promise<{
  contentType: string;
  body: string;
  headers?: Record<string, string>;
}>;

const ROUTES: Record<string, Route | undefined> = {
  '/': async () => ({
    contentType: 'text/html; charset=utf-8',
    body: PAGE_HTML,
    headers: { 'Content-Security-Policy': PAGE_CSP },
  }),
  '/api/fleet': async ({ state }) => ({
    contentType: 'application/json; charset=utf-8',
    body: JSON.stringify(state.snapshot()),
  }),
  '/metrics': async ({ metrics }) => ({
    contentType: metrics.contentType,
    body: await metrics.render(),
  }),
};

/** Returns the path of a request target, or undefined when invalid. */
function pathOf(target: string): string | undefined {
  try {
    return new URL(target, 'http://127.0.0.1').pathname;
  } catch {
    return undefined;
  }
}

/** Returns the host name of a Host header, without its port. */
function hostNameOf(header: string | undefined): string {
  if (header === undefined) return '';
  const name = header.startsWith('[')
    ? header.slice(0, header.indexOf(']') + 1)
    : header.split(':')[0];
  return name.toLowerCase();
}

function sendText(
  response: ServerResponse,
  status: number,
  message: string,
): void {
  send(response, status, 'text/plain; charset=utf-8', `${message}\n`);
}

function send(
  response: ServerResponse,
  status: number,
  contentType: string,
  body: string,
  headers: Record<string, string> = {},
): void {
  const bytes = Buffer.from(body, 'utf8');
  response.writeHead(status, {
    'Content-Type': contentType,
    'Content-Length': bytes.byteLength,
    'Cache-Control': 'no-store',
    'X-Content-Type-Options': 'nosniff',
    ...headers,
  });
  response.end(response.req.method === 'HEAD' ? undefined : bytes);
}

/**
 * Returns page.html with page.js inlined into its empty script element,
 * so that the page is one response and needs no second request.
 */
function buildPage(): string {
  const html = readFileSync(new URL('page.html', import.meta.url), 'utf8');
  const script = readFileSync(new URL('page.js', import.meta.url), 'utf8');
  const slot = '<script></script>';
  if (!html.includes(slot)) throw new Error(`page.html has no ${slot}`);
  return html.replace(slot, () => `<script>\n${script}</script>`);
}

/** Returns the CSP source of the page's one inline `<tag>` element. */
function inlineHash(html: string, tag: 'script' | 'style'): string {
  const match = new RegExp(`<${tag}>([\\s\\S]*?)</${tag}>`).exec(html);
  if (match === null) throw new Error(`page.html has no inline <${tag}>`);
  const digest = createHash('sha256').update(match[1], 'utf8').digest('base64');
  return `sha256-${digest}`;
}
