import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { NNsightError } from "../../ts/src/errors.js";
import {
  encodeSafetensors,
  parseSafetensorsHeader,
  parseShardIndex,
  readSafetensorsHeader,
  writeSafetensorsFile,
  type SafetensorsTensorData,
} from "../../ts/src/tensor/safetensors-format.js";

const concat = (chunks: Uint8Array[]) => Buffer.concat(chunks);

function sample(): SafetensorsTensorData[] {
  const f32 = new Float32Array([1, -2.5, 3.25, 0, 1e-8, 7]);
  return [
    { name: "b.weight", dtype: "F32", shape: [2, 3], bytes: new Uint8Array(f32.buffer) },
    { name: "a.bias", dtype: "BF16", shape: [3], bytes: new Uint8Array([1, 2, 3, 4, 5, 6]) },
    { name: "ids", dtype: "I64", shape: [2], bytes: new Uint8Array(new BigInt64Array([5n, -1n]).buffer) },
    { name: "scalar", dtype: "I32", shape: [], bytes: new Uint8Array(new Int32Array([42]).buffer) },
    { name: "empty", dtype: "F16", shape: [0, 4], bytes: new Uint8Array(0) },
    { name: "mask", dtype: "BOOL", shape: [3], bytes: new Uint8Array([1, 0, 1]) },
  ];
}

/** Build a file by hand from a header object and a data size. */
function rawFile(header: unknown, dataBytes: number, lengthOverride?: bigint): Buffer {
  const json = Buffer.from(JSON.stringify(header));
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(lengthOverride ?? BigInt(json.length));
  return Buffer.concat([prefix, json, Buffer.alloc(dataBytes)]);
}

function expectError(fn: () => unknown, code: string, ...fragments: (string | RegExp)[]): NNsightError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(NNsightError);
  const e = err as NNsightError;
  expect(e.code).toBe(code);
  for (const f of fragments) expect(e.message).toMatch(f);
  return e;
}

describe("safetensors format", () => {
  it("round-trips byte for byte, in the given order, with metadata and 8-byte alignment", () => {
    const tensors = sample();
    const file = concat(encodeSafetensors(tensors, { format: "pt", note: "x" }));
    const h = parseSafetensorsHeader(file, file.length, "t.safetensors");
    expect(h.dataStart % 8).toBe(0);
    expect(h.dataStart).toBe(8 + h.headerSize);
    expect(h.metadata).toEqual({ format: "pt", note: "x" });
    expect([...h.tensors.keys()]).toEqual(tensors.map((t) => t.name));
    for (const t of tensors) {
      const info = h.tensors.get(t.name)!;
      expect(info.dtype).toBe(t.dtype);
      expect(info.shape).toEqual(t.shape);
      expect(Buffer.from(file.subarray(info.begin, info.end)).equals(Buffer.from(t.bytes))).toBe(true);
    }
    // header padding is spaces, and re-encoding the parsed file reproduces it exactly
    expect(file.subarray(8, h.dataStart).toString("utf8").trimEnd().endsWith("}")).toBe(true);
    const again = concat(
      encodeSafetensors(
        [...h.tensors].map(([name, i]) => ({ name, dtype: i.dtype, shape: i.shape, bytes: file.subarray(i.begin, i.end) })),
        h.metadata,
      ),
    );
    expect(again.equals(file)).toBe(true);
  });

  it("parses the bundled stories260K checkpoint", async () => {
    const h = await readSafetensorsHeader(path.resolve("models/stories260K/model.safetensors"));
    expect(h.tensors.get("model.embed_tokens.weight")).toMatchObject({ dtype: "F32", shape: [512, 64] });
    expect(h.tensors.size).toBe(3 + 5 * 9);
    expect(h.metadata).toEqual({ format: "pt" });
  });

  it("writes files atomically, streaming lazy and chunked sources", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "st-"));
    const file = path.join(dir, "m.safetensors");
    const tensors = sample();
    const seen: string[] = [];
    await writeSafetensorsFile(
      file,
      tensors.map((t, i) => (i % 2 ? { ...t, bytes: () => [t.bytes.subarray(0, 1), t.bytes.subarray(1)] } : { ...t, bytes: () => t.bytes })),
      { format: "pt" },
      (name) => seen.push(name),
    );
    expect(seen).toEqual(tensors.map((t) => t.name));
    expect(readFileSync(file).equals(concat(encodeSafetensors(tensors, { format: "pt" })))).toBe(true);
    await expect(
      writeSafetensorsFile(path.join(dir, "bad.safetensors"), [{ name: "x", dtype: "F32", shape: [2], bytes: () => new Uint8Array(4) }]),
    ).rejects.toMatchObject({ code: "SHAPE" });
  });

  it("rejects byte counts that do not match dtype and shape when encoding", () => {
    expectError(() => encodeSafetensors([{ name: "x", dtype: "F16", shape: [3], bytes: new Uint8Array(4) }]), "SHAPE", /"x"/, /needs 6 bytes/);
    expectError(() => encodeSafetensors([sample()[0]!, sample()[0]!]), "BAD_INPUT", /duplicate/);
  });

  it("names the file and the first tensor that does not fit in a truncated file", () => {
    const file = concat(encodeSafetensors(sample()));
    const h = parseSafetensorsHeader(file, file.length, "m.safetensors");
    const cut = h.tensors.get("ids")!.begin + 3; // inside "ids", the third tensor
    const e = expectError(() => parseSafetensorsHeader(file.subarray(0, cut), cut, "m.safetensors"), "IO", /m\.safetensors/, /truncated/, /"ids"/);
    expect(e.details).toMatchObject({ file: "m.safetensors", tensor: "ids" });
    // cut inside the header
    expectError(() => parseSafetensorsHeader(file.subarray(0, 20), 20, "m.safetensors"), "IO", /truncated/, /header needs/);
    expectError(() => parseSafetensorsHeader(file.subarray(0, 5), 5, "m.safetensors"), "IO", /shorter than the 8-byte/);
  });

  it("rejects bad headers with IO errors", () => {
    const ok = { x: { dtype: "F32", shape: [2], data_offsets: [0, 8] } };
    const parse = (buf: Buffer) => () => parseSafetensorsHeader(buf, buf.length, "bad.safetensors");
    expectError(parse(rawFile(ok, 8, 10n ** 12n)), "IO", /header length .* exceeds/);
    const notJson = Buffer.concat([Buffer.from([8, 0, 0, 0, 0, 0, 0, 0]), Buffer.from("{nope   ")]);
    expectError(parse(notJson), "IO", /invalid JSON/);
    expectError(parse(rawFile([1, 2], 0)), "IO", /does not start with/);
    expectError(parse(rawFile({ x: { dtype: "F32", shape: [2, "a"], data_offsets: [0, 8] } }, 8)), "IO", /"x".*invalid shape/);
    expectError(parse(rawFile({ x: { dtype: "F32", shape: [3], data_offsets: [0, 8] } }, 8)), "IO", /"x".*needs 12 bytes/);
    expectError(parse(rawFile({ x: { dtype: "F32", shape: [2], data_offsets: [8, 0] } }, 8)), "IO", /end before they begin/);
    expectError(parse(rawFile({ ...ok, __metadata__: { a: 1 } }, 8)), "IO", /__metadata__\.a/);
    expectError(parse(rawFile(ok, 12)), "IO", /4 trailing bytes/);
    expectError(
      parse(rawFile({ x: { dtype: "F32", shape: [2], data_offsets: [4, 12] }, y: { dtype: "F32", shape: [1], data_offsets: [0, 4] }, z: { dtype: "F32", shape: [1], data_offsets: [8, 12] } }, 12)),
      "IO",
      /overlaps/,
    );
    expectError(parse(rawFile({ x: { dtype: "F32", shape: [1], data_offsets: [4, 8] } }, 8)), "IO", /hole of 4 bytes/);
  });

  it("lists unknown and refused dtypes", () => {
    const h = { x: { dtype: "Q4", shape: [2], data_offsets: [0, 2] }, y: { dtype: "F64", shape: [1], data_offsets: [2, 10] } };
    const buf = rawFile(h, 10);
    expectError(() => parseSafetensorsHeader(buf, buf.length, "q.safetensors"), "DTYPE", /x \(Q4\)/, /known: .*BF16/);
    const buf2 = rawFile({ y: { dtype: "F64", shape: [1], data_offsets: [0, 8] } }, 8);
    expect(parseSafetensorsHeader(buf2, buf2.length, "d.safetensors").tensors.get("y")!.dtype).toBe("F64");
    expectError(
      () => parseSafetensorsHeader(buf2, buf2.length, "d.safetensors", { allowedDtypes: ["F32", "BF16"] }),
      "DTYPE",
      /y \(F64\)/,
      /supported: F32, BF16/,
    );
  });

  it("reports a missing file as IO", async () => {
    await expect(readSafetensorsHeader("/nonexistent/x.safetensors")).rejects.toMatchObject({ code: "IO", message: expect.stringContaining("/nonexistent/x.safetensors") });
  });
});

describe("shard index", () => {
  const dir = "/models/m";
  it("maps tensors to absolute shard paths, files in first-seen order", () => {
    const idx = parseShardIndex(
      JSON.stringify({
        metadata: { total_size: 123 },
        weight_map: { "a.weight": "model-00002-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors", "c.weight": "model-00002-of-00002.safetensors" },
      }),
      dir,
    );
    expect(idx.metadata).toEqual({ total_size: 123 });
    expect(idx.files).toEqual([`${dir}/model-00002-of-00002.safetensors`, `${dir}/model-00001-of-00002.safetensors`]);
    expect(idx.weightMap.get("b.weight")).toBe(`${dir}/model-00001-of-00002.safetensors`);
  });

  it("rejects malformed indexes", () => {
    expectError(() => parseShardIndex("{", dir), "IO", /model\.safetensors\.index\.json/, /invalid JSON/);
    expectError(() => parseShardIndex({ metadata: {} }, dir), "IO", /no weight_map/);
    expectError(() => parseShardIndex({ weight_map: {} }, dir), "IO", /empty weight_map/);
    expectError(() => parseShardIndex({ weight_map: { a: "../evil.safetensors" } }, dir), "IO", /weight_map\["a"\]/);
    expectError(() => parseShardIndex({ weight_map: { a: 3 } }, dir), "IO", /weight_map\["a"\]/);
  });

  it("reads a real index written to disk", () => {
    const d = mkdtempSync(path.join(tmpdir(), "idx-"));
    writeFileSync(path.join(d, "model.safetensors.index.json"), JSON.stringify({ weight_map: { w: "s.safetensors" } }));
    const idx = parseShardIndex(readFileSync(path.join(d, "model.safetensors.index.json"), "utf8"), d);
    expect(idx.files).toEqual([path.join(d, "s.safetensors")]);
  });
});
