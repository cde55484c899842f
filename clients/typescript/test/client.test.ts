/**
 * The TypeScript client against a real `chronoplane serve` (started by
 * tests/test_typescript.py, its address in CHRONOPLANE_ADDRESS, with the tests' tasks).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromJson } from "@bufbuild/protobuf";
import {
  Code,
  ChronoplaneError,
  CreateJobRequestSchema,
  ExecutionStateSchema,
  JobSchema,
  MisfirePolicySchema,
  WatchEventKind,
  createChronoplaneClient,
  enumName,
  enumValue,
  fieldMask,
  seconds,
  toDate,
  toSeconds,
  valueToJson,
  type Execution,
  type Job,
  type WatchExecutionsResponse,
} from "../src/index.js";
import type { MessageInitShape } from "@bufbuild/protobuf";

/** A Job as a plain object (the generated init shape, not a message). */
type JobInit = Exclude<MessageInitShape<typeof JobSchema>, Job>;

const address = process.env.CHRONOPLANE_ADDRESS;
if (!address) throw new Error("set CHRONOPLANE_ADDRESS to a running server's host:port");
const client = createChronoplaneClient(address);

function job(id: string, init: Partial<JobInit> = {}): JobInit {
  return {
    id,
    task: "test.add",
    args: { a: 1, b: 2 },
    trigger: { kind: { case: "cron", value: { expression: "0 3 * * *", timeZone: "Europe/Berlin" } } },
    ...init,
  };
}

async function rejection(call: Promise<unknown>): Promise<ChronoplaneError> {
  try {
    await call;
  } catch (error) {
    assert.ok(error instanceof ChronoplaneError, `not a ChronoplaneError: ${String(error)}`);
    return error;
  }
  assert.fail("the call succeeded");
}

async function finished(id: string): Promise<Execution> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const { execution } = await client.getExecution({ id });
    assert.ok(execution);
    if (execution.endTime !== undefined) return execution;
    assert.ok(Date.now() < deadline, `execution ${id} did not finish: ${enumName(ExecutionStateSchema, execution.state)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test("create a job and trigger it: JSON args, Timestamp, Duration and the result", async () => {
  const { job: created } = await client.createJob({ job: job("ts-create", { misfireGrace: seconds(90) }) });
  assert.ok(created);
  assert.deepEqual(created.args, { a: 1, b: 2 });
  assert.equal(toSeconds(created.misfireGrace), 90);
  const next = toDate(created.nextRunTime);
  assert.ok(next instanceof Date && next.getTime() > Date.now(), `next run ${String(next)}`);
  assert.equal(created.createdBy, "anonymous");

  const { execution } = await client.triggerJob({ id: "ts-create", args: { a: 20, b: 22 } });
  assert.ok(execution);
  assert.equal(execution.jobId, "ts-create");
  const done = await finished(execution.id);
  assert.equal(enumName(ExecutionStateSchema, done.state), "EXECUTION_STATE_SUCCEEDED");
  assert.equal((valueToJson(done.result!) as { sum: number }).sum, 42);
  assert.ok(toSeconds(done.duration)! >= 0);
});

test("ListJobs pages through every job with page_size and page_token", async () => {
  const ids = Array.from({ length: 7 }, (_, i) => `ts-page-${i}`);
  await client.batchCreateJobs({ requests: ids.map((id) => ({ job: job(id) })) });
  const seen: string[] = [];
  let pageToken = "";
  let pages = 0;
  do {
    const page = await client.listJobs({ pageSize: 3, pageToken });
    assert.ok(page.jobs.length <= 3);
    seen.push(...page.jobs.map((j) => j.id));
    pageToken = page.nextPageToken;
    pages += 1;
  } while (pageToken !== "");
  assert.ok(pages >= 3, `${pages} pages`);
  assert.deepEqual(
    seen.filter((id) => id.startsWith("ts-page-")),
    ids,
  );
  assert.equal(new Set(seen).size, seen.length, "a job came twice");
});

test("UpdateJob with a stale etag fails ABORTED with reason ETAG_MISMATCH and changes nothing", async () => {
  const { job: created } = await client.createJob({ job: job("ts-etag", { displayName: "first" }) });
  assert.ok(created);
  const mask = fieldMask(JobSchema, "displayName");
  assert.deepEqual(mask.paths, ["display_name"]);
  const { job: updated } = await client.updateJob({
    job: { id: "ts-etag", displayName: "second", etag: created.etag },
    updateMask: mask,
  });
  assert.equal(updated?.displayName, "second");

  const error = await rejection(
    client.updateJob({ job: { id: "ts-etag", displayName: "third", etag: created.etag }, updateMask: mask }),
  );
  assert.equal(error.code, Code.Aborted);
  assert.equal(error.reason, "ETAG_MISMATCH");
  assert.equal(error.errorInfo?.domain, "chronoplane.dev");
  assert.equal(error.status.code, Code.Aborted);
  assert.match(error.status.message, /changed since it was read/);
  const { job: stored } = await client.getJob({ id: "ts-etag" });
  assert.equal(stored?.displayName, "second");
});

test("a bad cron fails INVALID_ARGUMENT and BadRequest names the field", async () => {
  const bad = job("ts-bad-cron", {
    trigger: { kind: { case: "cron", value: { expression: "61 * * * *" } } },
  });
  const error = await rejection(client.createJob({ job: bad }));
  assert.equal(error.code, Code.InvalidArgument);
  assert.equal(error.reason, "INVALID_ARGUMENT");
  const description = error.violationsByField.get("job.trigger.cron.expression");
  assert.ok(description, `violations: ${JSON.stringify(error.fieldViolations)}`);
  assert.match(description, /61/);
  assert.equal((await rejection(client.getJob({ id: "ts-bad-cron" }))).code, Code.NotFound);
});

test("an unknown enum name is refused before anything is sent", async () => {
  assert.throws(
    () => enumValue(MisfirePolicySchema, "RUN_ALL"),
    /"RUN_ALL" is not a chronoplane.v1.MisfirePolicy .*did you mean "MISFIRE_POLICY_RUN_ALL"\?/,
  );
  const asJson = { job: { id: "ts-enum", task: "test.add", misfirePolicy: "RUN_ALL" } };
  assert.throws(() => fromJson(CreateJobRequestSchema, asJson), /RUN_ALL/);
  assert.equal((await rejection(client.getJob({ id: "ts-enum" }))).code, Code.NotFound);

  const init: JobInit = job("ts-enum", {
    misfirePolicy: enumValue(MisfirePolicySchema, "MISFIRE_POLICY_RUN_ALL"),
  });
  const { job: created } = await client.createJob(create(CreateJobRequestSchema, { job: init }));
  assert.equal(enumName(MisfirePolicySchema, created!.misfirePolicy), "MISFIRE_POLICY_RUN_ALL");
});

test("WatchExecutions resumed from a cursor delivers every event after it", async () => {
  await client.createJob({ job: job("ts-watch", { paused: true }) });
  const first = new AbortController();
  const stream = client.watchExecutions({ jobIds: ["ts-watch"], snapshot: true }, { signal: first.signal });
  const before: WatchExecutionsResponse[] = [];
  const triggered: string[] = [];
  for await (const event of stream) {
    before.push(event);
    if (event.kind === WatchEventKind.SNAPSHOT_END) {
      for (let i = 0; i < 2; i++) triggered.push((await client.triggerJob({ id: "ts-watch" })).execution!.id);
    }
    if (event.kind === WatchEventKind.ADDED && event.execution?.id === triggered[0]) break;
  }
  first.abort();
  const cursor = before.at(-1)!.cursor;
  for (let i = 0; i < 2; i++) triggered.push((await client.triggerJob({ id: "ts-watch" })).execution!.id);

  const after: WatchExecutionsResponse[] = [];
  const ended = new Set<string>();
  const second = new AbortController();
  for await (const event of client.watchExecutions({ jobIds: ["ts-watch"], afterCursor: cursor }, { signal: second.signal })) {
    after.push(event);
    if (event.execution?.endTime !== undefined) ended.add(event.execution.id);
    if (triggered.every((id) => ended.has(id))) break;
  }
  second.abort();

  const cursors = after.map((e) => e.cursor);
  assert.ok(cursors.every((c, i) => c > (i === 0 ? cursor : cursors[i - 1]!)), `cursors ${cursors.join(",")} after ${cursor}`);
  const added = after.filter((e) => e.kind === WatchEventKind.ADDED).map((e) => e.execution!.id);
  assert.deepEqual(added, triggered.slice(1), "every execution created after the cursor, in order, once");
  for (const id of triggered) {
    const last = after.filter((e) => e.execution?.id === id).at(-1)!;
    assert.equal(enumName(ExecutionStateSchema, last.execution!.state), "EXECUTION_STATE_SUCCEEDED");
  }
});

test("a stream's error is a ChronoplaneError too: a cursor past the newest event is OUT_OF_RANGE", async () => {
  const watch = async () => {
    for await (const event of client.watchExecutions({ afterCursor: 1n << 40n })) assert.fail(`an event: ${event.kind}`);
  };
  const error = await rejection(watch());
  assert.equal(error.code, Code.OutOfRange);
  const newest = error.errorInfo?.metadata["newest_cursor"];
  assert.match(newest ?? "", /^\d+$/, JSON.stringify(error.errorInfo?.metadata));
  assert.ok(BigInt(newest!) < 1n << 40n);
});
