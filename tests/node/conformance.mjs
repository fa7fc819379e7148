// agentd's gRPC API as a Node caller (@grpc/grpc-js + @grpc/proto-loader) sees it.
//
// Run by tests/test_node_conformance.py against a real agentd server on loopback, whose
// scripted model makes every run deterministic. By hand:
//
//   AGENTD_TARGET=127.0.0.1:50051 AGENTD_PROTO_DIR=../../protos \
//   AGENTD_PROTO_INCLUDE=../../.venv/lib/python3.11/site-packages \
//   node conformance.mjs [check ...]
//
// With no check names every check runs. One line per check: `ok - <check>` or
// `not ok - <check> : <reason>`; the exit code is 1 when any check failed, 2 on bad usage.
//
// Environment:
//   AGENTD_TARGET          host:port of the agentd server (required)
//   AGENTD_PROTO_DIR       the directory holding agentd/v1/*.proto (default: ../../protos)
//   AGENTD_PROTO_INCLUDE   extra include dirs (path-delimiter separated) holding
//                          google/rpc/status.proto and google/rpc/error_details.proto
//   AGENTD_SERVICE_CONFIG  a gRPC service config JSON file for the channel (default: the
//                          client's client/agentd/client/service_config.json when it exists)
//   CONFORMANCE_TOOL_OUTPUT  what the caller-executed tool answers (the pytest checks the
//                          model saw exactly this)
//   CONFORMANCE_USER       the `user` sent in the run context (the pytest checks the
//                          model's instructions name this user)
//   CONFORMANCE_CUSTOMER_V1, CONFORMANCE_CUSTOMER_V2
//                          the `customer` in the run context of agent-api's run of
//                          version 1 and of version 2 of its agent (the pytest checks the
//                          model's instructions of each version name its customer)
//   CONFORMANCE_AGENT_ANSWER  the JSON text agent-api's scripted model answers; both
//                          runs must complete with it as their structured final output

import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { delimiter, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, "..", "..");
const TARGET = process.env.AGENTD_TARGET;
const PROTO_DIR = resolve(process.env.AGENTD_PROTO_DIR || join(REPO, "protos"));
const INCLUDE_DIRS = (process.env.AGENTD_PROTO_INCLUDE || "").split(delimiter).filter(Boolean).map((d) => resolve(d));
const TOOL_OUTPUT = process.env.CONFORMANCE_TOOL_OUTPUT || '{"customer": "c-7", "tier": "gold"}';
const USER = process.env.CONFORMANCE_USER || "Ada from Node";
const CUSTOMER_V1 = process.env.CONFORMANCE_CUSTOMER_V1 || "Ada (node, v1)";
const CUSTOMER_V2 = process.env.CONFORMANCE_CUSTOMER_V2 || "Bob (node, v2)";
const AGENT_ANSWER = JSON.parse(process.env.CONFORMANCE_AGENT_ANSWER || '{"sku": "A-1", "price_eur": 12.5}');
// The model agent-api's agent calls: the pytest scripts the model of this name.
const AGENT_MODEL = "pricing";
const CALL_TIMEOUT_MS = 10_000;
const TERMINAL = new Set(["run_completed", "run_failed", "run_cancelled"]);
const NOT_FOUND = grpc.status.NOT_FOUND; // 5
const FAILED_PRECONDITION = grpc.status.FAILED_PRECONDITION; // 9

// ---------------------------------------------------------------------------------------
// google.protobuf.Struct from a plain object.
//
// proto-loader/protobufjs take well-known types in their *message* shape: a Struct is
// `{fields: {key: Value}}` and a Value is `{stringValue: "v"}`, `{numberValue: 1}`, ...
// A plain object such as `{user: "Ada"}` given as `context` has no `fields` key, so it is
// encoded as an empty Struct: the context is dropped without an error. Convert first.
// As JSON.stringify does, a property whose value is `undefined` is left out of a Struct,
// and `undefined` in a list becomes null.

export function toValue(value) {
  if (value === null || value === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof value === "string") return { stringValue: value };
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new TypeError(`a Struct cannot hold ${value}`);
    return { numberValue: value };
  }
  if (typeof value === "bigint") return { numberValue: Number(value) };
  if (typeof value === "boolean") return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  if (typeof value === "object") return { structValue: toStruct(value) };
  throw new TypeError(`a Struct cannot hold a ${typeof value}`);
}

export function toStruct(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    throw new TypeError(`a Struct is made from a plain object, not ${Array.isArray(obj) ? "an array" : obj === null ? "null" : `a ${typeof obj}`}`);
  }
  const entries = Object.entries(obj).filter(([, v]) => v !== undefined);
  return { fields: Object.fromEntries(entries.map(([k, v]) => [k, toValue(v)])) };
}

// And back: a google.protobuf.Value / Struct as decoded (`oneofs: true`, `defaults: false`:
// an empty list or Struct comes without `values` / `fields`) to plain JS.

const VALUE_KINDS = ["nullValue", "numberValue", "stringValue", "boolValue", "structValue", "listValue"];

export function fromValue(value) {
  const which = value?.kind ?? VALUE_KINDS.find((k) => value?.[k] !== undefined);
  switch (which) {
    case "nullValue":
      return null;
    case "numberValue":
    case "stringValue":
    case "boolValue":
      return value[which];
    case "structValue":
      return fromStruct(value.structValue);
    case "listValue":
      return (value.listValue?.values ?? []).map(fromValue);
    default:
      throw new TypeError(`a Value without a kind: ${JSON.stringify(value)}`);
  }
}

export function fromStruct(struct) {
  return Object.fromEntries(Object.entries(struct?.fields ?? {}).map(([k, v]) => [k, fromValue(v)]));
}

// ---------------------------------------------------------------------------------------
// The API, loaded from the .proto files at run time (no generated code).

const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto: run_id, after_sequence, ...
  longs: Number, // int64 sequences fit a double here
  enums: String, // "REQUIRED_ACTION_TOOL_OUTPUT", not 1
  defaults: false,
  oneofs: true, // event.payload === "run_completed", ...
  includeDirs: [PROTO_DIR, ...INCLUDE_DIRS],
};

function loadAgentService() {
  const definition = protoLoader.loadSync(["agentd/v1/agent_service.proto"], LOADER_OPTIONS);
  return grpc.loadPackageDefinition(definition).agentd.v1.AgentService;
}

/** google.rpc.Status and error_details, decoded with protobufjs from the include dirs. */
function loadRpcStatus() {
  const root = new protobuf.Root();
  const dirs = [...INCLUDE_DIRS, PROTO_DIR];
  root.resolvePath = (origin, target) => {
    for (const dir of dirs) {
      const candidate = join(dir, target);
      if (existsSync(candidate)) return candidate;
    }
    return protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
  return root;
}

/** The service config for the channel: AGENTD_SERVICE_CONFIG, else the Python client's JSON file if it exists. */
function serviceConfig() {
  const path = process.env.AGENTD_SERVICE_CONFIG || join(REPO, "client", "agentd", "client", "service_config.json");
  if (!existsSync(path)) return { path, json: null };
  const text = readFileSync(path, "utf8");
  JSON.parse(text); // fail loudly on a broken file rather than in the channel
  return { path, json: text };
}

// ---------------------------------------------------------------------------------------
// Calls as promises.

const deadline = () => new Date(Date.now() + CALL_TIMEOUT_MS);

function unary(client, method, request) {
  return new Promise((resolvePromise, reject) => {
    client[method](request, { deadline: deadline() }, (err, response) => (err ? reject(err) : resolvePromise(response)));
  });
}

/**
 * Reads a server stream to its end: {events, status}; rejects with the call's error on a non-OK status.
 * Breaks off (cancels the call; `cancelled: true`) after `stopAfter` events, or after the first event
 * `stopWhen` accepts.
 */
function readStream(call, { stopAfter = Infinity, stopWhen = () => false } = {}) {
  return new Promise((resolvePromise, reject) => {
    const events = [];
    let cancelled = false;
    call.on("data", (response) => {
      if (cancelled) return; // a caller that broke off does not process later messages
      events.push(response.event);
      if (events.length >= stopAfter || stopWhen(response.event)) {
        cancelled = true;
        call.cancel();
        resolvePromise({ events, cancelled: true });
      }
    });
    call.on("error", (err) => {
      if (cancelled && err.code === grpc.status.CANCELLED) return;
      err.eventsBefore = events;
      reject(err);
    });
    call.on("status", (status) => {
      if (status.code === grpc.status.OK) resolvePromise({ events, cancelled: false, status });
    });
  });
}

/** The error a call ends with, or a failure when it succeeded. */
async function expectError(promise, what) {
  try {
    await promise;
  } catch (err) {
    if (typeof err.code === "number") return err;
    throw err;
  }
  assert.fail(`${what} succeeded; expected an error status`);
}

// ---------------------------------------------------------------------------------------
// Event stream rules.

const kind = (event) => event.payload;

function assertWellFormed(events, what = "stream") {
  assert.ok(events.length > 0, `${what}: no events`);
  const sequences = events.map((e) => e.sequence);
  sequences.forEach((seq, i) => {
    assert.equal(typeof seq, "number", `${what}: event ${i} has no sequence`);
    if (i === 0) assert.equal(seq, 1, `${what}: sequences start at ${seq}, not 1`);
    else assert.equal(seq, sequences[i - 1] + 1, `${what}: sequence ${sequences[i - 1]} is followed by ${seq} (gap, repeat or reorder): ${sequences.join(",")}`);
  });
  assert.equal(new Set(events.map((e) => e.run_id)).size, 1, `${what}: events of more than one run`);
  assert.match(events[0].run_id, /^run_/, `${what}: run id ${events[0].run_id}`);
  assert.equal(kind(events[0]), "run_started", `${what}: first event is ${kind(events[0])}`);
  const kinds = events.map(kind);
  const terminals = kinds.filter((k) => TERMINAL.has(k));
  assert.equal(terminals.length, 1, `${what}: ${terminals.length} terminal events (${kinds.join(",")})`);
  assert.ok(TERMINAL.has(kinds.at(-1)), `${what}: the last event is ${kinds.at(-1)}, not the terminal one (${kinds.join(",")})`);
}

// ---------------------------------------------------------------------------------------
// google.rpc.Status from the grpc-status-details-bin trailer.

function decodeStatusDetails(rpc, err) {
  const raw = err.metadata?.get("grpc-status-details-bin") ?? [];
  assert.ok(
    raw.length > 0,
    `no grpc-status-details-bin trailer on ${grpc.status[err.code]} (${err.code}) "${err.details}"` +
      ` (trailer keys: ${Object.keys(err.metadata?.getMap() ?? {}).join(", ") || "none"})`,
  );
  const Status = rpc.lookupType("google.rpc.Status");
  const status = Status.decode(Buffer.from(raw[0]));
  const details = (status.details ?? []).map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    assert.equal(any.type_url, `type.googleapis.com/${typeName}`, `detail type_url ${any.type_url}`);
    const Type = rpc.lookupType(typeName);
    return { typeName, message: Type.toObject(Type.decode(any.value), { defaults: true, longs: String, enums: String }) };
  });
  return { code: status.code, message: status.message, details };
}

function detail(decoded, typeName) {
  const found = decoded.details.filter((d) => d.typeName === typeName);
  assert.equal(found.length, 1, `expected one ${typeName} in the details, got: ${JSON.stringify(decoded.details)}`);
  return found[0].message;
}

function assertStatusDetails(rpc, err, code, check) {
  assert.equal(err.code, code, `status ${grpc.status[err.code]} (${err.code}) "${err.details}", expected ${grpc.status[code]} (${code})`);
  const decoded = decodeStatusDetails(rpc, err);
  assert.equal(decoded.code, err.code, `google.rpc.Status.code ${decoded.code} differs from the call's status ${err.code}`);
  check(decoded);
}

// ---------------------------------------------------------------------------------------
// The checks. Each gets {client, rpc} and throws on failure; the pytest sets the model's
// scripts (tests/test_node_conformance.py says which agent each check runs).

const unique = (prefix) => `${prefix}-${process.pid}-${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;

const checks = {
  /** 1. StreamRun: sequences 1..N, no gap, exactly one terminal event, last; context as a Struct. */
  async "stream-run"({ client }) {
    const call = client.StreamRun(
      { start: { agent: "agents/assistant", input: "Weather in Paris?", context: toStruct({ user: USER, tags: ["node", 1, true, null] }) } },
      { deadline: deadline() },
    );
    const { events } = await readStream(call);
    assertWellFormed(events, "StreamRun");
    const kinds = events.map(kind);
    assert.ok(kinds.includes("tool_called") && kinds.includes("tool_output"), `no tool call in ${kinds.join(",")}`);
    const last = events.at(-1);
    assert.equal(kind(last), "run_completed", `ended with ${JSON.stringify(last)}`);
    assert.equal(last.run_completed.final_output?.stringValue, "Sunny in Paris.");
  },

  /** 2. Run (bidi): answer a caller-executed tool call and an approval on the same stream. */
  async "bidi-tool-and-approval"({ client }) {
    const call = client.Run({ deadline: deadline() });
    const answered = { tool_output: [], approval: [] };
    const done = new Promise((resolvePromise, reject) => {
      const events = [];
      call.on("data", ({ event }) => {
        events.push(event);
        if (kind(event) === "action_required") {
          const { action, item } = event.action_required;
          const callId = item.tool_call.call_id;
          if (action === "REQUIRED_ACTION_TOOL_OUTPUT") {
            answered.tool_output.push(item.tool_call.tool_name);
            call.write({ tool_outputs: { outputs: [{ call_id: callId, output: TOOL_OUTPUT }] } });
          } else if (action === "REQUIRED_ACTION_APPROVAL") {
            answered.approval.push(item.tool_call.tool_name);
            call.write({ approval: { call_id: callId, approved: true } });
          } else {
            reject(new Error(`unexpected action ${action}`));
          }
        }
        if (TERMINAL.has(kind(event))) call.end(); // half-close: the server ends the stream with OK
      });
      call.on("error", reject);
      call.on("status", (status) => {
        if (status.code === grpc.status.OK) resolvePromise(events);
      });
    });
    call.write({ start: { agent: "agents/operator", input: "refund A-1 for c-7" } });
    const events = await done;
    assertWellFormed(events, "Run");
    assert.deepEqual(answered, { tool_output: ["lookup_customer"], approval: ["issue_refund"] });
    const outputs = Object.fromEntries(
      events.filter((e) => kind(e) === "tool_output").map((e) => [e.tool_output.item.tool_result.tool_name, e.tool_output.item.tool_result]),
    );
    assert.equal(outputs.lookup_customer?.output, TOOL_OUTPUT, `lookup_customer's result: ${JSON.stringify(outputs.lookup_customer)}`);
    assert.ok(!outputs.lookup_customer.is_error, "lookup_customer's result is an error");
    assert.equal(outputs.issue_refund?.output, "refunded 5.00 EUR for A-1", `issue_refund's result: ${JSON.stringify(outputs.issue_refund)}`);
    const last = events.at(-1);
    assert.equal(kind(last), "run_completed", `ended with ${JSON.stringify(last)}`);
    assert.equal(last.run_completed.final_output?.stringValue, "Refund handled.");
  },

  /** 3. WatchRun: break the stream after a few events, resume after the last sequence seen. */
  async "watch-resume"({ client }) {
    const created = await unary(client, "CreateRun", { start: { agent: "agents/assistant", input: "slow one", context: toStruct({ user: USER }) } });
    const name = created.run.name;
    assert.match(name, /^runs\/run_/);
    const BREAK_AFTER = 3;
    const first = await readStream(client.WatchRun({ name }, { deadline: deadline() }), { stopAfter: BREAK_AFTER });
    assert.ok(first.cancelled, "the run ended before the stream could be broken");
    assert.equal(first.events.length, BREAK_AFTER);
    assert.ok(!first.events.some((e) => TERMINAL.has(kind(e))), "the broken stream already held the terminal event");
    const lastSeen = first.events.at(-1).sequence;
    const rest = await readStream(client.WatchRun({ name, after_sequence: lastSeen }, { deadline: deadline() }));
    assert.ok(rest.events.length > 0, "nothing after the resume point");
    assert.equal(rest.events[0].sequence, lastSeen + 1, `resumed at ${rest.events[0].sequence} after ${lastSeen}`);
    const joined = [...first.events, ...rest.events];
    assertWellFormed(joined, "broken + resumed WatchRun");
    const full = await readStream(client.WatchRun({ name, after_sequence: 0 }, { deadline: deadline() }));
    assertWellFormed(full.events, "full WatchRun");
    assert.deepEqual(joined, full.events, "broken + resumed stream differs from a full WatchRun");
    assert.equal(kind(full.events.at(-1)), "run_completed");
  },

  /** 4a. Unknown agent on StreamRun: NOT_FOUND with ErrorInfo AGENT_NOT_FOUND and ResourceInfo. */
  async "error-agent-not-found-stream"({ client, rpc }) {
    const agent = unique("no-such-agent");
    const err = await expectError(readStream(client.StreamRun({ start: { agent, input: "hi" } }, { deadline: deadline() })), "StreamRun with an unknown agent");
    assertAgentNotFound(rpc, err, agent);
  },

  /** 4a'. The same on the unary CreateRun. */
  async "error-agent-not-found-unary"({ client, rpc }) {
    const agent = unique("no-such-agent");
    const err = await expectError(unary(client, "CreateRun", { start: { agent, input: "hi" } }), "CreateRun with an unknown agent");
    assertAgentNotFound(rpc, err, agent);
  },

  /** 4b. A second run on a busy session (default policy: reject) on StreamRun: FAILED_PRECONDITION, SESSION_BUSY. */
  async "error-session-busy-stream"({ client, rpc }) {
    await withBusySession(client, async (session, activeRun) => {
      const err = await expectError(
        readStream(client.StreamRun({ start: { agent: "agents/assistant", input: "second", session } }, { deadline: deadline() })),
        "StreamRun on a busy session",
      );
      assertSessionBusy(rpc, err, session, activeRun);
    });
  },

  /** 4b'. The same on the unary CreateRun. */
  async "error-session-busy-unary"({ client, rpc }) {
    await withBusySession(client, async (session, activeRun) => {
      const err = await expectError(
        unary(client, "CreateRun", { start: { agent: "agents/assistant", input: "second", session } }),
        "CreateRun on a busy session",
      );
      assertSessionBusy(rpc, err, session, activeRun);
    });
  },

  /**
   * 5. A service with no Python code defines an agent (CreateAgent, from a plain JS object),
   * runs it, updates it while a run of version 1 waits for the caller's tool, runs version 2,
   * and the waiting run finishes on version 1; both end with the structured output.
   */
  async "agent-api"({ client, rpc }) {
    const id = unique("node-pricing");
    const agentName = `agents/${id}`;
    const v1 = pricingAgent(id, "v1");

    const created = (await unary(client, "CreateAgent", { definition: toStruct(v1) })).agent;
    assert.equal(created.name, agentName);
    assert.equal(created.version, 1, `CreateAgent made version ${created.version}`);
    assert.equal(created.source, "AGENT_SOURCE_API");
    assert.deepEqual(
      (created.tools ?? []).map((t) => [t.name, t.caller_executed === true]),
      [["price_lookup", true]],
      `tools: ${JSON.stringify(created.tools)}`,
    );
    // The nested schemas (arrays, `additionalProperties: false`) made the round trip intact.
    const stored = fromStruct(created.definition);
    assert.equal(stored.instructions, v1.instructions);
    assert.deepEqual(stored.tools?.[0]?.parameters, v1.tools[0].parameters, `stored tool: ${JSON.stringify(stored.tools)}`);
    assert.deepEqual(stored.output_schema, v1.output_schema, `stored output_schema: ${JSON.stringify(stored.output_schema)}`);

    // A run of version 1 waits for the caller's tool...
    const first = (await unary(client, "CreateRun", {
      start: { agent: agentName, input: "price of A-1?", context: toStruct({ customer: CUSTOMER_V1 }) },
    })).run;
    assert.equal(first.agent_version, 1, `the first run executes version ${first.agent_version}`);
    const firstCall = await waitForToolCall(client, first.name);

    // ...while the agent is updated to version 2 (and a stale update conflicts).
    const v2 = pricingAgent(id, "v2");
    const updated = (await unary(client, "UpdateAgent", { name: agentName, definition: toStruct(v2), expected_version: 1 })).agent;
    assert.equal(updated.version, 2, `UpdateAgent made version ${updated.version}`);
    assert.equal(fromStruct(updated.definition).instructions, v2.instructions);
    const stale = await expectError(
      unary(client, "UpdateAgent", { name: agentName, definition: toStruct(pricingAgent(id, "v3")), expected_version: 1 }),
      "UpdateAgent with a stale expected_version",
    );
    assertStatusDetails(rpc, stale, grpc.status.ABORTED, (decoded) => {
      const info = detail(decoded, "google.rpc.ErrorInfo");
      assert.equal(info.reason, "VERSION_CONFLICT");
      assert.equal(info.metadata?.latest_version, "2", `ErrorInfo.metadata: ${JSON.stringify(info.metadata)}`);
    });
    assert.equal((await unary(client, "GetAgent", { name: agentName })).agent.version, 2, "GetAgent does not serve the latest version");
    const versions = (await unary(client, "ListAgentVersions", { parent: agentName })).versions ?? [];
    assert.deepEqual(versions.map((v) => v.name), [`${agentName}/versions/2`, `${agentName}/versions/1`]);

    // A run started now executes version 2, to the end.
    const second = (await unary(client, "CreateRun", {
      start: { agent: agentName, input: "price of A-1?", context: toStruct({ customer: CUSTOMER_V2 }) },
    })).run;
    assert.equal(second.agent_version, 2, `the second run executes version ${second.agent_version}`);
    const secondCall = await waitForToolCall(client, second.name);
    await answerPrice(client, second.name, secondCall);
    await assertPricedOn(client, second.name, 2);

    // The run started before the update finishes on version 1.
    await answerPrice(client, first.name, firstCall);
    await assertPricedOn(client, first.name, 1);
  },
};

/** An agent in the agent file format (agent.schema.json), as a plain JS object. */
function pricingAgent(id, label) {
  return {
    name: id,
    description: "Quotes prices.",
    instructions: `You quote prices for {customer} (${label}).`,
    model: AGENT_MODEL,
    tools: [{
      type: "caller",
      name: "price_lookup",
      description: "Look a price up in the caller's catalogue.",
      parameters: {
        type: "object",
        properties: { sku: { type: "string" } },
        required: ["sku"],
        additionalProperties: false,
      },
      needs_approval: false,
    }],
    output_schema: {
      type: "object",
      properties: { sku: { type: "string" }, price_eur: { type: "number" } },
      required: ["sku", "price_eur"],
      additionalProperties: false,
    },
  };
}

/** The caller-executed tool call a run waits on, from its event stream (WatchRun, no polling). */
async function waitForToolCall(client, name) {
  const { events, cancelled } = await readStream(client.WatchRun({ name }, { deadline: deadline() }), {
    stopWhen: (e) => kind(e) === "action_required" || TERMINAL.has(kind(e)),
  });
  const last = events.at(-1);
  assert.ok(cancelled && kind(last) === "action_required", `${name} never asked for a tool output: ${events.map(kind).join(",")}`);
  const { action, item } = last.action_required;
  assert.equal(action, "REQUIRED_ACTION_TOOL_OUTPUT");
  const toolCall = item.tool_call;
  assert.equal(toolCall.tool_name, "price_lookup");
  const args = fromStruct(toolCall.arguments);
  assert.equal(typeof args.sku, "string", `price_lookup's arguments: ${JSON.stringify(args)}`);
  return toolCall;
}

/** Answers a price_lookup call as the calling service would. */
async function answerPrice(client, name, toolCall) {
  const { run } = await unary(client, "SubmitToolOutputs", {
    name,
    outputs: [{ call_id: toolCall.call_id, output: JSON.stringify({ price_eur: AGENT_ANSWER.price_eur }) }],
  });
  assert.equal(run.name, name);
}

/** The run completed on `version` with the scripted structured answer: in its events and in GetRun. */
async function assertPricedOn(client, name, version) {
  const { events } = await readStream(client.WatchRun({ name }, { deadline: deadline() }));
  assertWellFormed(events, `WatchRun ${name}`);
  assert.equal(events[0].run_started.agent_version, version, `${name}: run_started.agent_version ${events[0].run_started.agent_version}`);
  const last = events.at(-1);
  assert.equal(kind(last), "run_completed", `${name} ended with ${JSON.stringify(last)}`);
  const output = last.run_completed.final_output;
  assert.equal(output?.kind, "structValue", `${name}: the final output is not structured: ${JSON.stringify(output)}`);
  assert.deepEqual(fromValue(output), AGENT_ANSWER);
  const { run } = await unary(client, "GetRun", { name });
  assert.equal(run.status, "RUN_STATUS_COMPLETED");
  assert.equal(run.agent_version, version, `${name}: GetRun agent_version ${run.agent_version}`);
  assert.deepEqual(fromValue(run.completed?.final_output), AGENT_ANSWER);
}

function assertAgentNotFound(rpc, err, agent) {
  assertStatusDetails(rpc, err, NOT_FOUND, (decoded) => {
    const info = detail(decoded, "google.rpc.ErrorInfo");
    assert.equal(info.reason, "AGENT_NOT_FOUND");
    assert.equal(info.domain, "agentd.dev");
    assert.equal(info.metadata?.agent, agent, `ErrorInfo.metadata: ${JSON.stringify(info.metadata)}`);
    const resource = detail(decoded, "google.rpc.ResourceInfo");
    assert.equal(resource.resource_type, "agentd.dev/Agent");
    assert.equal(resource.resource_name, `agents/${agent}`);
  });
}

function assertSessionBusy(rpc, err, session, activeRun) {
  assertStatusDetails(rpc, err, FAILED_PRECONDITION, (decoded) => {
    const info = detail(decoded, "google.rpc.ErrorInfo");
    assert.equal(info.reason, "SESSION_BUSY");
    assert.equal(info.domain, "agentd.dev");
    assert.equal(info.metadata?.session, session, `ErrorInfo.metadata: ${JSON.stringify(info.metadata)}`);
    assert.equal(info.metadata?.active_run, activeRun, `ErrorInfo.metadata: ${JSON.stringify(info.metadata)}`);
  });
}

/** Starts a long run on a fresh session, hands (session, "runs/<id>") to `body`, then cancels the run. */
async function withBusySession(client, body) {
  const session = `sessions/${unique("node-busy")}`;
  const created = await unary(client, "CreateRun", { start: { agent: "agents/assistant", input: "first", session } });
  const activeRun = created.run.name;
  assert.match(activeRun, /^runs\/run_/);
  try {
    await body(session, activeRun);
  } finally {
    await unary(client, "CancelRun", { name: activeRun, reason: "node conformance cleanup" }).catch(() => {});
  }
}

// ---------------------------------------------------------------------------------------

async function main() {
  const names = process.argv.slice(2);
  const unknown = names.filter((n) => !(n in checks));
  if (!TARGET || unknown.length) {
    if (unknown.length) console.error(`unknown check(s): ${unknown.join(", ")}`);
    console.error(`usage: AGENTD_TARGET=host:port node conformance.mjs [${Object.keys(checks).join(" | ")} ...]`);
    process.exit(2);
  }
  const AgentService = loadAgentService();
  const rpc = loadRpcStatus();
  const config = serviceConfig();
  const options = config.json ? { "grpc.service_config": config.json } : {};
  console.log(`# target ${TARGET}; service config ${config.json ? `loaded from ${config.path}` : `absent (${config.path})`}`);
  const client = new AgentService(TARGET, grpc.credentials.createInsecure(), options);
  let failed = 0;
  for (const name of names.length ? names : Object.keys(checks)) {
    try {
      await checks[name]({ client, rpc });
      console.log(`ok - ${name}`);
    } catch (err) {
      failed += 1;
      const reason = err?.code !== undefined && typeof err.code === "number" && err.details !== undefined
        ? `${grpc.status[err.code]} (${err.code}): ${err.details}`
        : err?.message ?? String(err);
      console.log(`not ok - ${name} : ${reason.replace(/\n/g, "\n#   ")}`);
    }
  }
  client.close();
  process.exit(failed ? 1 : 0);
}

await main();
