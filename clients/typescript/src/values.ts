/**
 * Typed conversions between plain TypeScript values and the API's protobuf types: enums by
 * their full proto name, field masks from field names, Timestamp and Duration, Struct.
 * Generated messages hold Struct fields (Job.args, TriggerJobRequest.args) as plain
 * JsonObject already; a Value field (Execution.result) is a Value message: valueToJson.
 */
import {
  create,
  fromJson,
  toJson,
  type DescEnum,
  type DescMessage,
  type JsonObject,
  type JsonValue,
  type MessageShape,
} from "@bufbuild/protobuf";
import {
  durationFromMs,
  durationMs,
  FieldMaskSchema,
  StructSchema,
  timestampDate,
  timestampFromDate,
  ValueSchema,
  type Duration,
  type FieldMask,
  type Struct,
  type Timestamp,
  type Value,
} from "@bufbuild/protobuf/wkt";

/**
 * The number of an enum value from its full proto name ("OVERLAP_POLICY_BUFFER_ALL"), as
 * the JSON mapping and grpcurl spell it. An unknown name throws here, before any request is
 * sent: it is never dropped to the default value.
 */
export function enumValue(schema: DescEnum, name: string): number {
  const value = schema.values.find((v) => v.name === name);
  if (value !== undefined) return value.number;
  const prefixed = schema.values.find((v) => v.name === `${schema.sharedPrefix?.toUpperCase() ?? ""}${name}`);
  const hint = prefixed ? `; did you mean ${JSON.stringify(prefixed.name)}?` : "";
  const known = schema.values.map((v) => v.name).join(", ");
  throw new RangeError(`${JSON.stringify(name)} is not a ${schema.typeName} (one of ${known})${hint}`);
}

/** The full proto name of an enum number ("EXECUTION_STATE_SUCCEEDED"); throws if unknown. */
export function enumName(schema: DescEnum, value: number): string {
  const found = schema.value[value];
  if (found === undefined) throw new RangeError(`${value} is not a ${schema.typeName} value`);
  return found.name;
}

/**
 * A FieldMask naming fields of a message by their TypeScript names ("displayName"): the
 * paths are the proto names ("display_name") the server expects. An unknown name throws.
 */
export function fieldMask<Desc extends DescMessage>(
  schema: Desc,
  ...fields: (keyof MessageShape<Desc> & string)[]
): FieldMask {
  const paths = fields.map((name) => {
    const field = schema.fields.find((f) => f.localName === name || f.name === name);
    if (field === undefined) throw new RangeError(`${schema.typeName} has no field ${JSON.stringify(name)}`);
    return field.name;
  });
  return create(FieldMaskSchema, { paths });
}

/** A Timestamp from a Date (or now). */
export function timestamp(date: Date = new Date()): Timestamp {
  return timestampFromDate(date);
}

/** A Date from a Timestamp; undefined for an unset one (such as a paused job's nextRunTime). */
export function toDate(value: Timestamp | undefined): Date | undefined {
  return value === undefined ? undefined : timestampDate(value);
}

/** A Duration of this many seconds (fractions to the nanosecond). */
export function seconds(value: number): Duration {
  return durationFromMs(value * 1000);
}

/** The length of a Duration in seconds; undefined for an unset one. */
export function toSeconds(value: Duration | undefined): number | undefined {
  return value === undefined ? undefined : durationMs(value) / 1000;
}

/** A Struct from a plain JSON object. */
export function structFromJson(value: JsonObject): Struct {
  return fromJson(StructSchema, value);
}

/** A plain JSON object from a Struct. */
export function structToJson(value: Struct): JsonObject {
  return toJson(StructSchema, value) as JsonObject;
}

/** A Value from any JSON value. */
export function valueFromJson(value: JsonValue): Value {
  return fromJson(ValueSchema, value);
}

/** A plain JSON value from a Value. */
export function valueToJson(value: Value): JsonValue {
  return toJson(ValueSchema, value);
}
