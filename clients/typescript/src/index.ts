/**
 * The EWS Call Gateway from TypeScript: a typed client generated from openapi.yaml
 * (openapi-typescript + openapi-fetch), and `watchCall`, which follows a call's state
 * over `fetch` streaming (a browser's EventSource cannot send Authorization or X-API-Key).
 */

import createClient, { type Client, type Middleware } from "openapi-fetch";
import type { components, paths } from "./schema.js";
import { readEvents } from "./events.js";

export type { components, paths } from "./schema.js";
export { readEvents, type ServerSentEvent } from "./events.js";

export type CallInformation = components["schemas"]["CallInformation"];
export type PlacedCall = components["schemas"]["PlacedCall"];
export type Problem = components["schemas"]["Problem"];
export type GatewayClient = Client<paths>;

export interface GatewayOptions {
  /** The gateway's base URL, e.g. "https://gateway.example.com". */
  baseUrl: string;
  /** Sent as X-API-Key (GATEWAY_AUTH=apikey). */
  apiKey?: string;
  /** A bearer token, or a function returning a fresh one (GATEWAY_AUTH=jwt). */
  token?: string | (() => string | Promise<string>);
  /** The fetch to use (default: globalThis.fetch). */
  fetch?: typeof fetch;
}

/** Build the typed client: `client.POST("/calls", ...)`, `client.GET("/calls/{callId}", ...)`. */
export function createGatewayClient(options: GatewayOptions): GatewayClient {
  const client = createClient<paths>({ baseUrl: options.baseUrl, fetch: options.fetch });
  const auth: Middleware = {
    async onRequest({ request }) {
      for (const [name, value] of Object.entries(await credentials(options))) {
        request.headers.set(name, value);
      }
      return request;
    },
  };
  client.use(auth);
  return client;
}

async function credentials(options: GatewayOptions): Promise<Record<string, string>> {
  const headers: Record<string, string> = {};
  if (options.apiKey) headers["X-API-Key"] = options.apiKey;
  if (options.token) {
    const token = typeof options.token === "function" ? await options.token() : options.token;
    headers["Authorization"] = `Bearer ${token}`;
  }
  return headers;
}

/** A failure the gateway answered with a problem+json body (status, Retry-After). */
export class GatewayProblem extends Error {
  constructor(
    readonly problem: Problem,
    /** Seconds the gateway asked to wait (Retry-After), if it did. */
    readonly retryAfterSeconds?: number,
  ) {
    super(`${problem.status} ${problem.title}: ${problem.detail}`);
    this.name = "GatewayProblem";
  }

  get status(): number {
    return this.problem.status;
  }
}

/** What watching a call yields. */
export type CallEvent =
  | { type: "state"; id: string; call: CallInformation }
  /** Reading the call's state failed during the watch (a `problem` event); the watch ends after this. */
  | { type: "problem"; problem: Problem; retryAfterSeconds?: number }
  /** The stream broke or the instance is stopping: watchCall reconnects after `retryMs`. */
  | { type: "reconnecting"; retryMs: number; lastEventId?: string };

export interface WatchOptions {
  /** Resume after this event id (the `id` of the last state you saw): only later states follow. */
  lastEventId?: string;
  /** Stop watching. */
  signal?: AbortSignal;
  /** Reconnections in a row that may fail before watchCall gives up (default 5). */
  maxReconnects?: number;
}

const DEFAULT_RETRY_MS = 1000;

/**
 * Follow a call's state: its current state, then each change, until it is Disconnected.
 *
 * Reconnects by itself (with Last-Event-ID, so no state is repeated or goes back) when the
 * stream breaks or the instance stops, and ends at once when that id was the call's end (204).
 * Throws GatewayProblem when the watch is refused before it starts (a bad call id, an unknown
 * call, missing credentials, too many streams, a throttled Exchange).
 */
export async function* watchCall(
  options: GatewayOptions,
  callId: string,
  watch: WatchOptions = {},
): AsyncGenerator<CallEvent> {
  const url = `${options.baseUrl.replace(/\/$/, "")}/calls/${encodeURIComponent(callId)}/events`;
  let lastEventId = watch.lastEventId;
  let retryMs = DEFAULT_RETRY_MS;
  let failures = 0;
  for (;;) {
    const headers: Record<string, string> = { Accept: "text/event-stream", ...(await credentials(options)) };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    let response: Response;
    try {
      response = await (options.fetch ?? fetch)(url, { headers, signal: watch.signal });
    } catch (error) {
      if (watch.signal?.aborted || ++failures > (watch.maxReconnects ?? 5)) throw error;
      yield { type: "reconnecting", retryMs, lastEventId };
      await sleep(retryMs, watch.signal);
      continue;
    }
    // 204: the last event seen was the call's end; there is nothing more to watch.
    if (response.status === 204) return;
    if (!response.ok || !response.body) throw await problemOf(response);
    failures = 0;
    try {
      for await (const event of readEvents(response.body)) {
        if (event.retry !== undefined) retryMs = event.retry;
        if (event.event === "state" && event.id !== undefined) {
          lastEventId = event.id;
          const call = JSON.parse(event.data) as CallInformation;
          yield { type: "state", id: event.id, call };
          if (call.state === "Disconnected") return;
        } else if (event.event === "problem") {
          const problem = JSON.parse(event.data) as Problem & { retryAfter?: number };
          yield { type: "problem", problem, retryAfterSeconds: problem.retryAfter };
          return;
        }
      }
    } catch (error) {
      if (watch.signal?.aborted) throw error;
    }
    // The stream ended before Disconnected: the instance stopped, or the connection broke.
    yield { type: "reconnecting", retryMs, lastEventId };
    await sleep(retryMs, watch.signal);
  }
}

async function problemOf(response: Response): Promise<GatewayProblem> {
  const retryAfter = response.headers.get("Retry-After");
  let problem: Problem;
  try {
    problem = (await response.json()) as Problem;
  } catch {
    problem = { type: "about:blank", title: response.statusText, status: response.status, detail: "", requestId: "" };
  }
  return new GatewayProblem(problem, retryAfter === null ? undefined : Number(retryAfter));
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}
