/**
 * The client against a real `ews-gateway demo` (GATEWAY_URL), started by
 * tests/integration/test_typescript_client.py.
 */

import assert from "node:assert/strict";
import { test } from "node:test";

import { type CallEvent, createGatewayClient, GatewayProblem, readEvents, watchCall } from "../src/index.js";

const baseUrl = process.env.GATEWAY_URL ?? "";
const options = { baseUrl };
const client = createGatewayClient(options);

async function placeCall(dialString = "+15551234567"): Promise<string> {
  const { data, error, response } = await client.POST("/calls", {
    body: { itemId: "AAMkADemoVoiceMail", dialString },
  });
  assert.equal(response.status, 201, JSON.stringify(error));
  assert.ok(data);
  assert.equal(response.headers.get("Location"), `/calls/${encodeURIComponent(data.callId)}`);
  return data.callId;
}

test("GATEWAY_URL names the demo", () => {
  assert.match(baseUrl, /^http:\/\/127\.0\.0\.1:[0-9]+$/);
});

test("watching a call yields Connecting, Alerted, Connected, then Disconnected after hanging up", async () => {
  const callId = await placeCall();
  const states: string[] = [];
  const ids: string[] = [];
  for await (const event of watchCall(options, callId)) {
    assert.equal(event.type, "state", JSON.stringify(event));
    if (event.type !== "state") break;
    states.push(event.call.state);
    ids.push(event.id);
    assert.equal(event.call.callId, callId);
    if (event.call.state === "Connected") {
      const { data, response } = await client.DELETE("/calls/{callId}", { params: { path: { callId } } });
      assert.equal(response.status, 200);
      assert.equal(data?.status, "disconnected");
    }
  }
  assert.deepEqual(states, ["Connecting", "Alerted", "Connected", "Disconnected"]);
  // Each id starts with the rank of its state in a call's life.
  assert.deepEqual(ids.map((id) => id.split(".")[0]), ["1", "2", "3", "4"]);
});

test("a watch resumed from the call's end ends at once, with nothing more", async () => {
  const callId = await placeCall();
  await client.DELETE("/calls/{callId}", { params: { path: { callId } } });
  let lastEventId = "";
  for await (const event of watchCall(options, callId)) {
    if (event.type === "state") lastEventId = event.id;
  }
  assert.match(lastEventId, /^4\./);
  const resumed: CallEvent[] = [];
  for await (const event of watchCall(options, callId, { lastEventId })) resumed.push(event);
  assert.deepEqual(resumed, []);
});

test("resuming with the last event id does not repeat that state", async () => {
  const callId = await placeCall();
  const first = await watchCall(options, callId).next();
  assert.equal(first.done, false);
  const seen = first.value as CallEvent & { type: "state" };
  assert.equal(seen.call.state, "Connecting");
  const resumed = watchCall(options, callId, { lastEventId: seen.id });
  const next = await resumed.next();
  assert.equal(next.done, false);
  const event = next.value as CallEvent & { type: "state" };
  assert.equal(event.type, "state");
  assert.notEqual(event.call.state, "Connecting");
  assert.ok(Number(event.id.split(".")[0]) > 1, "only states after the one seen");
  await resumed.return(undefined);
  await client.DELETE("/calls/{callId}", { params: { path: { callId } } });
});

test("an unknown call is refused with its 404 problem before any stream", async () => {
  await assert.rejects(
    watchCall(options, "no-such-call").next(),
    (error: unknown) =>
      error instanceof GatewayProblem &&
      error.status === 404 &&
      error.problem.type === "urn:ews-gateway:problem:call-not-found" &&
      error.problem.ewsResponseCode === "ErrorInvalidPhoneCallId",
  );
});

test("a watch refused before it starts throws the problem", async () => {
  await assert.rejects(
    watchCall(options, "x".repeat(513)).next(),
    (error: unknown) => error instanceof GatewayProblem && error.status === 400,
  );
});

test("the typed GET shows a call's state and a typed problem for an unknown one", async () => {
  const callId = await placeCall();
  const found = await client.GET("/calls/{callId}", { params: { path: { callId } } });
  assert.equal(found.response.status, 200);
  assert.ok(["Connecting", "Alerted", "Connected"].includes(found.data?.state ?? ""));
  const missing = await client.GET("/calls/{callId}", { params: { path: { callId: "no-such-call" } } });
  assert.equal(missing.response.status, 404);
  assert.equal(missing.error?.type, "urn:ews-gateway:problem:call-not-found");
  await client.DELETE("/calls/{callId}", { params: { path: { callId } } });
});

test("the event reader joins data lines and takes CR, LF and CRLF line ends", async () => {
  const text = ": comment\r\nid: 1-a\revent: state\ndata: {\"a\":\ndata: 1}\r\n\r\nretry: 250\n\n";
  const body = new Blob([text]).stream();
  const events = [];
  for await (const event of readEvents(body)) events.push(event);
  assert.deepEqual(events, [
    { event: "state", data: "{\"a\":\n1}", id: "1-a" },
    { event: "message", data: "", retry: 250 },
  ]);
});

test("a stream that ends with a retry hint is resumed with Last-Event-ID after that long", async () => {
  const seen: Array<string | null> = [];
  const bodies = [
    'id: 3.aaaaaaaaaaaa\nevent: state\ndata: {"callId":"c","state":"Connected","connectionFailureCause":"None","ewsResponseCode":"NoError"}\n\n: this instance is stopping; reconnect\nretry: 20\n\n',
    'id: 4.bbbbbbbbbbbb\nevent: state\ndata: {"callId":"c","state":"Disconnected","connectionFailureCause":"None","ewsResponseCode":"NoError"}\n\n',
  ];
  const fakeFetch = (async (_url: string | URL | Request, init?: RequestInit) => {
    seen.push(new Headers(init?.headers).get("Last-Event-ID"));
    return new Response(bodies.shift(), { status: 200, headers: { "Content-Type": "text/event-stream" } });
  }) as typeof fetch;
  const events: CallEvent[] = [];
  for await (const event of watchCall({ baseUrl: "http://gateway.invalid", fetch: fakeFetch }, "c")) {
    events.push(event);
  }
  assert.deepEqual(
    events.map((event) => event.type === "state" ? event.call.state : event.type),
    ["Connected", "reconnecting", "Disconnected"],
  );
  assert.deepEqual(events[1], { type: "reconnecting", retryMs: 20, lastEventId: "3.aaaaaaaaaaaa" });
  assert.deepEqual(seen, [null, "3.aaaaaaaaaaaa"]);
});

test("a problem event ends the watch with the problem and its wait", async () => {
  const state = { callId: "c", state: "Connected", connectionFailureCause: "None", ewsResponseCode: "NoError" };
  const problem = {
    type: "urn:ews-gateway:problem:exchange-busy",
    title: "Exchange is throttling requests",
    status: 503,
    detail: "Exchange answered ErrorServerBusy",
    requestId: "r",
    retryAfter: 3,
  };
  const body = `id: 3.aaaaaaaaaaaa\nevent: state\ndata: ${JSON.stringify(state)}\n\n` +
    `retry: 3000\nevent: problem\ndata: ${JSON.stringify(problem)}\n\n`;
  const fakeFetch = (async () =>
    new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } })) as typeof fetch;
  const events: CallEvent[] = [];
  for await (const event of watchCall({ baseUrl: "http://gateway.invalid", fetch: fakeFetch }, "c")) {
    events.push(event);
  }
  assert.deepEqual(events.map((event) => event.type), ["state", "problem"]);
  const last = events[1];
  assert.ok(last && last.type === "problem");
  assert.equal(last.problem.status, 503);
  assert.equal(last.retryAfterSeconds, 3);
});
