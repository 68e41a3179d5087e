// Decoder of the telematics wire format v2, written from docs/wire-format.md ("Format v2") alone.
// decodeBatch(bytes) -> {device, version, records: [{seq, utc, kind, ...fields}]}; throws WireError.

import { inflateRawSync } from "node:zlib";
import { decode as msgpackDecode } from "@msgpack/msgpack";

export const VERSION = 2;
export const CONTENT_TYPE = "application/vnd.telematics.batch.v2";
const MAX_BODY = 16 * 1024 * 1024;
const MAX_RECORDS = 65536;
const SAFE = 2 ** 53;

// Fix columns after seq and utc, in wire order; true for integer fields.
const FIX_NUMBERS = [
  ["lat", false], ["lon", false], ["alt_m", false], ["speed_mps", false], ["course_deg", false],
  ["quality", true], ["hdop", false], ["sats_used", true], ["mode", true], ["geoid_sep_m", false],
  ["pdop", false], ["vdop", false], ["sats_in_view", true], ["lat_err_m", false], ["lon_err_m", false],
  ["alt_err_m", false],
];
const FIX_TEXTS = ["status", "faa_mode"];

export class WireError extends Error {}

function fail(message) {
  throw new WireError(`v2: ${message}`);
}

const isArray = Array.isArray;
const isBin = (x) => x instanceof Uint8Array;
const isInt = (x) => typeof x === "number" && Number.isInteger(x);

/** Elements of a positional array, with defaults for the left-out trailing ones. */
function fields(value, defaults, what) {
  if (!isArray(value)) fail(`${what} must be an array`);
  if (value.length > defaults.length) fail(`${what} has ${value.length} elements, at most ${defaults.length} allowed`);
  return defaults.map((d, i) => (i < value.length ? value[i] : d));
}

const REQUIRED = Symbol("required");

function presentBits(present, n) {
  if (present === null) return null;
  if (!isBin(present) || present.length !== Math.ceil(n / 8)) fail("presence bitmap of a wrong size");
  const bits = [];
  for (let i = 0; i < n; i++) bits.push(((present[i >> 3] >> (i & 7)) & 1) === 1);
  return bits;
}

/** The values of a column for n records (null where absent); isInt: an integer field. */
function column(col, n, isIntField) {
  if (col === null || col === undefined) return new Array(n).fill(null);
  const [data, order, gcd, scale, present, modulus] = fields(col, [REQUIRED, 0, 1, 1, null, 0], "a column");
  if (data === REQUIRED) fail("a column without data");
  const bits = presentBits(present, n);
  const count = bits === null ? n : bits.filter(Boolean).length;
  let values;
  if (isBin(data)) {
    if (order !== 0 || gcd !== 1 || scale !== 1 || modulus !== 0) fail("a raw float64 column with integer parameters");
    if (data.length !== 8 * count) fail("a raw float64 column of a wrong length");
    const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
    values = [];
    for (let i = 0; i < count; i++) values.push(view.getFloat64(8 * i, false));
  } else {
    if (!isArray(data) || !data.every(isInt)) fail("column data must be integers or a bin");
    if (data.length > count) fail(`a column holds ${data.length} values for ${count} records`);
    if (![0, 1, 2].includes(order) || !isInt(gcd) || gcd < 1 || !isInt(modulus) || modulus < 0) {
      fail("column parameters out of range");
    }
    if (typeof scale !== "number" || !(scale > 0) || !Number.isFinite(scale)) fail("column scale out of range");
    const v = data.concat(new Array(count - data.length).fill(0));
    for (let i = 1; i < count; i++) v[i] *= gcd;
    for (let p = order; p >= 1; p--) {
      for (let i = p; i < count; i++) v[i] += v[i - 1];
    }
    for (let i = 0; i < count; i++) {
      if (modulus > 0) v[i] = ((v[i] % modulus) + modulus) % modulus;
      if (Math.abs(v[i]) > SAFE) fail("a value beyond 2**53");
    }
    if (isIntField) {
      if (scale !== 1) fail("an integer field with a scale");
      values = v;
    } else {
      values = v.map((x) => x / scale);
    }
  }
  if (bits === null) return values;
  let k = 0;
  return bits.map((b) => (b ? values[k++] : null));
}

function seqAndUtc(n, seqCol, utcCol) {
  if (!isInt(n) || n < 1 || n > MAX_RECORDS) fail(`a section of ${n} records`);
  if (!isArray(seqCol) || (seqCol.length > 4 && seqCol[4] !== null) || isBin(seqCol[0])) {
    fail("a seq column must be integers with no absent values");
  }
  const seqs = column(seqCol, n, true);
  if (seqs.some((s) => s < 0)) fail("a negative sequence number");
  if (utcCol === null || utcCol === undefined) fail("a section without its utc column");
  const times = column(utcCol, n, false);
  if (times.includes(null)) fail("a record without a time");
  return [seqs, times];
}

function perRecord(list, n, check, what) {
  if (!isArray(list) || list.length !== n || !list.every(check)) fail(`${what}: not ${n} valid entries`);
  return list;
}

const isText = (x) => typeof x === "string";
const isScalar = (x) => x === null || ["boolean", "number", "string"].includes(typeof x);
const isAttrs = (x) => x !== null && typeof x === "object" && !isArray(x) && !isBin(x) && Object.values(x).every(isScalar);

function fixSection(section) {
  const [n, columns, texts] = fields(section, [REQUIRED, REQUIRED, []], "the fix section");
  if (!isArray(columns) || columns.length > 2 + FIX_NUMBERS.length) fail("more fix columns than this version defines");
  if (!isArray(texts) || texts.length > FIX_TEXTS.length) fail("more fix text columns than this version defines");
  const [seqs, times] = seqAndUtc(n, columns[0] ?? null, columns[1] ?? null);
  const numbers = FIX_NUMBERS.map(([, isIntField], i) => column(columns[2 + i] ?? null, n, isIntField));
  if (numbers[0].includes(null) || numbers[1].includes(null)) fail("a fix without a position");
  const strings = FIX_TEXTS.map((_, i) => {
    const t = texts[i] ?? null;
    if (t === null || isText(t)) return new Array(n).fill(t);
    return perRecord(t, n, (x) => x === null || isText(x), "a text column");
  });
  return seqs.map((seq, r) => {
    const rec = { seq, utc: times[r], kind: "fix" };
    FIX_NUMBERS.forEach(([name], i) => (rec[name] = numbers[i][r]));
    FIX_TEXTS.forEach((name, i) => (rec[name] = strings[i][r]));
    return rec;
  });
}

function signalSeries(series) {
  const [name, unit, source, n, seqCol, utcCol, valueCol] = fields(
    series, [REQUIRED, REQUIRED, REQUIRED, REQUIRED, REQUIRED, REQUIRED, null], "a signal series");
  if (!isText(name) || !(unit === null || isText(unit)) || !(source === null || isText(source))) {
    fail("a signal series with a bad name, unit or source");
  }
  const [seqs, times] = seqAndUtc(n, seqCol, utcCol);
  const values = column(valueCol, n, false);
  return seqs.map((seq, r) => ({ seq, utc: times[r], kind: "signal", name, value: values[r], unit, source }));
}

function eventSection(section) {
  const [n, seqCol, utcCol, types, attrs, latCol, lonCol] = fields(
    section, [REQUIRED, REQUIRED, REQUIRED, REQUIRED, REQUIRED, null, null], "the event section");
  const [seqs, times] = seqAndUtc(n, seqCol, utcCol);
  perRecord(types, n, isText, "event types");
  perRecord(attrs, n, isAttrs, "event attrs");
  const lat = column(latCol, n, false);
  const lon = column(lonCol, n, false);
  return seqs.map((seq, r) => ({
    seq, utc: times[r], kind: "event", type: types[r], lat: lat[r], lon: lon[r], attrs: attrs[r],
  }));
}

function statusSection(section) {
  const [n, seqCol, utcCol, types, attrs] = fields(
    section, [REQUIRED, REQUIRED, REQUIRED, REQUIRED, REQUIRED], "the status section");
  const [seqs, times] = seqAndUtc(n, seqCol, utcCol);
  perRecord(types, n, isText, "status types");
  perRecord(attrs, n, isAttrs, "status attrs");
  return seqs.map((seq, r) => ({ seq, utc: times[r], kind: "status", type: types[r], attrs: attrs[r] }));
}

function inflate(bytes) {
  if (bytes.length < 1 || bytes[0] !== VERSION) fail(`a payload must start with byte ${VERSION}`);
  try {
    return inflateRawSync(bytes.subarray(1), { maxOutputLength: MAX_BODY });
  } catch (err) {
    fail(`not a whole DEFLATE stream within ${MAX_BODY} bytes: ${err.message}`);
  }
}

/** Decode one v2 payload (a Uint8Array or Buffer) into {device, version, records}. */
export function decodeBatch(bytes) {
  let body;
  try {
    body = msgpackDecode(inflate(bytes));
  } catch (err) {
    if (err instanceof WireError) throw err;
    fail(`not one MessagePack value: ${err.message}`);
  }
  const [version, device, fixes, signals, events, status] = fields(
    body, [REQUIRED, REQUIRED, null, [], null, null], "the body");
  if (version !== VERSION) fail(`the body says version ${version}`);
  if (!isText(device)) fail("the device id must be a string");
  if (!isArray(signals)) fail("signals must be an array");
  // Record counts first (index 0 of a section, 3 of a series): no work for a batch that claims too many.
  const counts = [fixes, events, status].map((s) => (isArray(s) ? s[0] : 0)).concat(
    signals.map((s) => (isArray(s) ? s[3] : 0)));
  if (counts.reduce((sum, c) => sum + (isInt(c) ? c : 0), 0) > MAX_RECORDS) {
    fail(`more than ${MAX_RECORDS} records in one batch`);
  }
  const records = [];
  if (fixes !== null) records.push(...fixSection(fixes));
  for (const series of signals) records.push(...signalSeries(series));
  if (events !== null) records.push(...eventSection(events));
  if (status !== null) records.push(...statusSection(status));
  records.sort((a, b) => a.seq - b.seq); // stable (ECMAScript 2019): section order where seq ties
  return { device, version, records };
}
