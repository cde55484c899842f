/**
 * Rich errors. Chronoplane fails a call with a google.rpc.Status in the
 * `grpc-status-details-bin` trailer: every error carries an ErrorInfo (a machine-readable
 * `reason`, domain "chronoplane.dev", metadata such as cursors), INVALID_ARGUMENT also a
 * BadRequest naming each offending field. ChronoplaneError exposes them typed.
 */
import { create, createRegistry, fromBinary, type Message } from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { ConnectError, type Interceptor } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
  ResourceInfoSchema,
  RetryInfoSchema,
  type BadRequest,
  type BadRequest_FieldViolation,
  type ErrorInfo,
} from "./gen/google/rpc/error_details_pb.js";
import { StatusSchema, type Status } from "./gen/google/rpc/status_pb.js";

const DETAILS = createRegistry(
  BadRequestSchema,
  ErrorInfoSchema,
  PreconditionFailureSchema,
  ResourceInfoSchema,
  RetryInfoSchema,
);
const STATUS_DETAILS_HEADER = "grpc-status-details-bin";

/**
 * A failed call, with the google.rpc.Status the server sent and its details decoded. It is a
 * ConnectError too, and keeps ConnectError's name: Connect recognises its errors by that name
 * (Symbol.hasInstance) and would otherwise wrap this one into a plain ConnectError again.
 */
export class ChronoplaneError extends ConnectError {
  /** The google.rpc.Status of the `grpc-status-details-bin` trailer (code and message only if absent). */
  readonly status: Status;
  /** Every detail of the status that this client knows (BadRequest, ErrorInfo, ...). */
  readonly detailMessages: Message[];

  constructor(error: ConnectError) {
    super(error.rawMessage, error.code, error.metadata, undefined, error.cause);
    this.details = error.details;
    this.status = decodeStatus(error);
    this.detailMessages = this.status.details.flatMap((any) => anyUnpack(any, DETAILS) ?? []);
  }

  /** Only errors made by this class (ConnectError's own check accepts any ConnectError). */
  static override [Symbol.hasInstance](value: unknown): boolean {
    return typeof value === "object" && value !== null && Object.prototype.isPrototypeOf.call(ChronoplaneError.prototype, value);
  }

  /** Wraps anything a call threw; a ChronoplaneError is returned as it is. */
  static override from(reason: unknown): ChronoplaneError {
    if (reason instanceof ChronoplaneError) return reason;
    return new ChronoplaneError(ConnectError.from(reason));
  }

  /** The ErrorInfo detail, which every Chronoplane error carries. */
  get errorInfo(): ErrorInfo | undefined {
    return this.detailMessages.find((m): m is ErrorInfo => m.$typeName === ErrorInfoSchema.typeName);
  }

  /** ErrorInfo's reason, for example "ETAG_MISMATCH" or "INVALID_ARGUMENT"; "" without one. */
  get reason(): string {
    return this.errorInfo?.reason ?? "";
  }

  /** BadRequest's field violations, in the order the server sent them. */
  get fieldViolations(): BadRequest_FieldViolation[] {
    return this.detailMessages.flatMap((m) => (isBadRequest(m) ? m.fieldViolations : []));
  }

  /** The field violations as a map from field path (snake_case, as in the proto) to description. */
  get violationsByField(): Map<string, string> {
    return new Map(this.fieldViolations.map((v) => [v.field, v.description]));
  }
}

function isBadRequest(message: Message): message is BadRequest {
  return message.$typeName === BadRequestSchema.typeName;
}

function decodeStatus(error: ConnectError): Status {
  const encoded = error.metadata.get(STATUS_DETAILS_HEADER);
  if (encoded) {
    return fromBinary(StatusSchema, base64Decode(encoded));
  }
  // No trailer (for example a transport failure): the code and message are all there is.
  return create(StatusSchema, { code: error.code, message: error.rawMessage });
}

/**
 * Turns every error of a call, unary or streaming, into a ChronoplaneError. Installed by
 * createChronoplaneClient; add it to your own transport's interceptors otherwise.
 */
export const richErrors: Interceptor = (next) => async (request) => {
  let response;
  try {
    response = await next(request);
  } catch (error) {
    throw ChronoplaneError.from(error);
  }
  if (!response.stream) return response;
  const messages = response.message;
  return {
    ...response,
    message: (async function* () {
      try {
        yield* messages;
      } catch (error) {
        throw ChronoplaneError.from(error);
      }
    })(),
  };
};
