/** A SchedulerService client over HTTP/2 gRPC (what the Chronoplane server speaks). */
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { SchedulerService } from "./gen/chronoplane/v1/scheduler_service_pb.js";
import { richErrors } from "./errors.js";

export type SchedulerClient = Client<typeof SchedulerService>;

export interface ClientOptions {
  /** An API token, sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** Connect over TLS (https) instead of plaintext. */
  tls?: boolean;
  /** More interceptors, run after the client's own. */
  interceptors?: Interceptor[];
}

/**
 * A client for the server at `address` ("127.0.0.1:50051"). Every error it throws is a
 * ChronoplaneError, with the server's BadRequest and ErrorInfo details decoded.
 */
export function createChronoplaneClient(address: string, options: ClientOptions = {}): SchedulerClient {
  const interceptors: Interceptor[] = [richErrors];
  if (options.token !== undefined) interceptors.push(bearer(options.token));
  const transport = createGrpcTransport({
    baseUrl: `${options.tls ? "https" : "http"}://${address}`,
    interceptors: [...interceptors, ...(options.interceptors ?? [])],
  });
  return createClient(SchedulerService, transport);
}

function bearer(token: string): Interceptor {
  return (next) => (request) => {
    request.header.set("authorization", `Bearer ${token}`);
    return next(request);
  };
}
