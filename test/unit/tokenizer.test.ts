import { readFileSync } from "node:fs";
import { beforeAll, describe, expect, it } from "vitest";
import { Tokenizer } from "../../ts/src/models/tokenizer.js";

const DIR = "models/stories260K";
const GOLDEN_IDS = [
  1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358,
  394, 261, 370, 432, 352, 266, 268, 388, 426, 338, 391, 266, 267, 337, 335, 312, 432, 398, 312, 286, 267, 414, 270, 333, 415, 426, 13, 438, 310,
];
const GOLDEN_TEXT =
  "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily";

describe("Tokenizer on stories260K", () => {
  let tok: Tokenizer;
  beforeAll(async () => {
    tok = await Tokenizer.fromDir(DIR);
  });

  it("encodes like HF, BOS included", () => {
    expect(tok.encode("Once upon a time")).toEqual([1, 403, 407, 261, 378]);
    expect(tok.encode("Once upon a time", { addSpecialTokens: false })).toEqual([403, 407, 261, 378]);
    expect(tok.encodeBatch(["Once upon a time", "a"])).toEqual([[1, 403, 407, 261, 378], tok.encode("a")]);
  });

  it("decodes the golden generation to run.c's text", () => {
    expect(tok.decode(GOLDEN_IDS, { skipSpecialTokens: true })).toBe(GOLDEN_TEXT);
    expect(tok.decode(GOLDEN_IDS)).toBe("<s> " + GOLDEN_TEXT);
    expect(tok.decode([])).toBe("");
    expect(() => tok.decode([1.5])).toThrow(expect.objectContaining({ code: "BAD_INPUT" }));
  });

  it("exposes special ids, vocabulary and padding", () => {
    expect(tok.bosTokenId).toBe(1);
    expect(tok.eosTokenIds).toEqual([2, 1]); // tokenizer's </s>, then generation_config's [2, 1]
    expect(tok.padTokenId).toBe(2);
    expect(tok.vocabSize).toBe(512);
    expect(tok.paddingSide).toBe("left");
    expect(tok.pad([[5, 6, 7], [8]])).toEqual({ inputIds: [[5, 6, 7], [2, 2, 8]], attentionMask: [[1, 1, 1], [0, 0, 1]] });
    tok.paddingSide = "right";
    expect(tok.pad([[5, 6, 7], [8]]).inputIds).toEqual([[5, 6, 7], [8, 2, 2]]);
    tok.paddingSide = "left";
  });

  it("decodeToken gives each token's text in context, byte pieces included", () => {
    expect(tok.decodeToken(403)).toBe(" Once");
    expect(tok.decodeToken(13)).toBe("\n"); // <0x0A>
    const pieces = GOLDEN_IDS.slice(1).map((id) => tok.decodeToken(id)).join("");
    expect(pieces).toBe(" " + GOLDEN_TEXT);
    const ids = tok.encode("☃", { addSpecialTokens: false }); // byte fallback: ▁ then three byte pieces
    expect(ids.map((i) => tok.idToToken(i))).toEqual(["▁", "<0xE2>", "<0x98>", "<0x83>"]);
    expect(tok.decodeToken(ids[1]!)).toBe("\uFFFD");
  });

  it("streams text without splitting UTF-8 characters", () => {
    const text = "Once upon a time ☃ the café, 日本!";
    const ids = tok.encode(text);
    const s = tok.streamDecoder({ skipSpecialTokens: true });
    const parts = ids.map((id) => s.push(id));
    parts.push(s.flush());
    expect(parts.join("")).toBe(text);
    expect(parts.some((p) => p.includes("\uFFFD"))).toBe(false);
    const long = tok.streamDecoder({ skipSpecialTokens: true });
    expect(GOLDEN_IDS.map((id) => long.push(id)).join("") + long.flush()).toBe(GOLDEN_TEXT);
  });

  it("has no chat template: BAD_INPUT", () => {
    expect(tok.hasChatTemplate).toBe(false);
    expect(() => tok.applyChatTemplate([{ role: "user", content: "hi" }])).toThrow(expect.objectContaining({ code: "BAD_INPUT", message: expect.stringMatching(/no chat template/) }));
  });
});

describe("chat templates", () => {
  const json = JSON.parse(readFileSync(`${DIR}/tokenizer.json`, "utf8"));
  const config = JSON.parse(readFileSync(`${DIR}/tokenizer_config.json`, "utf8"));
  const template =
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" +
    "[{{ m['role'] }}] {{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}";

  it("renders messages with the special tokens and the generation prompt", () => {
    const tok = new Tokenizer(json, { ...config, chat_template: template });
    const messages = [
      { role: "user", content: " Once upon " },
      { role: "assistant", content: "a time" },
    ];
    expect(tok.applyChatTemplate(messages)).toBe("<s>[user] Once upon</s>[assistant] a time</s>");
    expect(tok.applyChatTemplate(messages, { addGenerationPrompt: true })).toBe("<s>[user] Once upon</s>[assistant] a time</s>[assistant] ");
    const ids = tok.encodeChat(messages);
    expect(ids[0]).toBe(1);
    expect(ids.filter((i) => i === 1)).toHaveLength(1); // the template's BOS only
    expect(ids.filter((i) => i === 2)).toHaveLength(2);
  });

  it("accepts the named-template list form and reports template errors as BAD_INPUT", () => {
    const tok = new Tokenizer(json, { ...config, chat_template: [{ name: "default", template }, { name: "tool_use", template: "x" }] });
    expect(tok.applyChatTemplate([{ role: "user", content: "hi" }])).toBe("<s>[user] hi</s>");
    expect(() => tok.applyChatTemplate([{ role: "system", content: "x" }])).toThrow(expect.objectContaining({ code: "BAD_INPUT", message: expect.stringMatching(/no system/) }));
    expect(() => tok.applyChatTemplate([{ role: "user" } as never])).toThrow(expect.objectContaining({ code: "BAD_INPUT" }));
  });

  it("reports a missing tokenizer.json", async () => {
    await expect(Tokenizer.fromDir("/nonexistent")).rejects.toMatchObject({ code: "IO", message: expect.stringMatching(/no tokenizer\.json/) });
  });
});
