export { createChronoplaneClient, type ClientOptions, type SchedulerClient } from "./client.js";
export { ChronoplaneError, richErrors } from "./errors.js";
export {
  enumName,
  enumValue,
  fieldMask,
  seconds,
  structFromJson,
  structToJson,
  timestamp,
  toDate,
  toSeconds,
  valueFromJson,
  valueToJson,
} from "./values.js";
export { Code } from "@connectrpc/connect";
export * from "./gen/chronoplane/v1/audit_pb.js";
export * from "./gen/chronoplane/v1/execution_pb.js";
export * from "./gen/chronoplane/v1/instance_pb.js";
export * from "./gen/chronoplane/v1/job_pb.js";
export * from "./gen/chronoplane/v1/scheduler_service_pb.js";
export * from "./gen/google/rpc/error_details_pb.js";
export * from "./gen/google/rpc/status_pb.js";
