// The README's example: node dist/examples/hello.js (after npm run build), with a server on
// CHRONOPLANE_ADDRESS (default 127.0.0.1:50051).
import {
  ChronoplaneError,
  Code,
  ExecutionStateSchema,
  JobSchema,
  MisfirePolicySchema,
  createChronoplaneClient,
  enumName,
  enumValue,
  fieldMask,
  seconds,
  toDate,
  valueToJson,
} from "../src/index.js";

const client = createChronoplaneClient(process.env.CHRONOPLANE_ADDRESS ?? "127.0.0.1:50051");

const { job } = await client.createJob({
  job: {
    id: "ts-hello",
    task: "chronoplane.echo",
    args: { greeting: "hello", n: 3 },
    trigger: { kind: { case: "cron", value: { expression: "0 6 * * *", timeZone: "Europe/Berlin" } } },
    misfireGrace: seconds(90),
    misfirePolicy: enumValue(MisfirePolicySchema, "MISFIRE_POLICY_RUN_ALL"),
  },
});
console.log("created", job!.id, job!.args, "next run", toDate(job!.nextRunTime)?.toISOString());

const { execution } = await client.triggerJob({ id: "ts-hello" });
await new Promise((resolve) => setTimeout(resolve, 200));
const { execution: run } = await client.getExecution({ id: execution!.id });
console.log("run", enumName(ExecutionStateSchema, run!.state), valueToJson(run!.result!));

try {
  await client.updateJob({
    job: { id: "ts-hello", displayName: "Hello", etag: "stale" },
    updateMask: fieldMask(JobSchema, "displayName"), // sent as ["display_name"]
  });
} catch (error) {
  if (!(error instanceof ChronoplaneError)) throw error;
  console.log(Code[error.code], error.reason, "-", error.rawMessage);
}

try {
  await client.createJob({
    job: { id: "ts-bad", task: "chronoplane.echo", trigger: { kind: { case: "cron", value: { expression: "61 * * * *" } } } },
  });
} catch (error) {
  if (!(error instanceof ChronoplaneError)) throw error;
  for (const { field, description } of error.fieldViolations) console.log(Code[error.code], field, "-", description);
}

try {
  enumValue(MisfirePolicySchema, "RUN_ALL");
} catch (error) {
  console.log(String(error));
}
