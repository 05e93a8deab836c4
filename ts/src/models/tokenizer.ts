/**
 * A Hugging Face tokenizer (`tokenizer.json` + `tokenizer_config.json`) over the pure-JS
 * `@huggingface/tokenizers`, with the conventions generation needs: BOS added like HF, the
 * end-of-sequence ids of generation_config.json, left padding, per-token text for streaming,
 * and chat templates rendered with `@huggingface/jinja`.
 */
import { readFile } from "node:fs/promises";
import * as path from "node:path";
import { Template } from "@huggingface/jinja";
import { Tokenizer as HFTokenizer } from "@huggingface/tokenizers";
import { NNsightError } from "../errors.js";
import { readJsonFile } from "./config.js";

/** One chat message; extra fields (tool calls etc.) are passed to the template as they are. */
export interface ChatMessage {
  role: string;
  content: string;
  [key: string]: unknown;
}

/** Options of {@link Tokenizer.applyChatTemplate}. */
export interface ChatTemplateOptions {
  /** End with the header of an assistant turn, so the model answers (default false). */
  addGenerationPrompt?: boolean;
  /** More variables for the template (`tools`, `documents`, ...). */
  extra?: Record<string, unknown>;
}

/** Options of the {@link Tokenizer} constructor. */
export interface TokenizerOptions {
  /** More end-of-sequence ids (e.g. generation_config.json's), added after the tokenizer's own. */
  extraEosTokenIds?: readonly number[];
  /** A chat template that overrides tokenizer_config.json's (e.g. from chat_template.jinja). */
  chatTemplate?: string;
}

/** Text of a special-token entry: `"<s>"` or an AddedToken object `{content: "<s>", ...}`. */
function tokenText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") return (v as { content: string }).content;
  return null;
}

function idList(v: unknown): number[] {
  if (typeof v === "number" && Number.isInteger(v)) return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === "number" && Number.isInteger(x));
  return [];
}

function checkIds(ids: readonly number[], what: string): void {
  if (!Array.isArray(ids)) throw new NNsightError("BAD_INPUT", `${what}: expected an array of token ids`);
  for (const id of ids) {
    if (!Number.isInteger(id) || id < 0) throw new NNsightError("BAD_INPUT", `${what}: ${String(id)} is not a token id`);
  }
}

/** Pick the template string out of tokenizer_config.json's `chat_template` (string or named list). */
function pickChatTemplate(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (Array.isArray(v)) {
    const named = v.find((t) => t && typeof t === "object" && (t as { name?: unknown }).name === "default");
    const tpl = (named as { template?: unknown } | undefined)?.template;
    return typeof tpl === "string" ? tpl : null;
  }
  return null;
}

/** A loaded tokenizer. Construct with {@link Tokenizer.fromDir} or from parsed JSON. */
export class Tokenizer {
  /** The wrapped `@huggingface/tokenizers` instance. */
  readonly hf: HFTokenizer;
  /** tokenizer_config.json as given (`{}` when there was none). */
  readonly config: Record<string, unknown>;
  readonly bosTokenId: number | null;
  /** Ids that end a sequence: the tokenizer's EOS, then any extra ones, without duplicates. */
  readonly eosTokenIds: number[];
  /** Id used to pad batches: `pad_token`, else the first EOS, else 0. */
  readonly padTokenId: number;
  /**
   * Side batches are padded on. Defaults to `left`, which batched generation needs, whatever
   * tokenizer_config.json says.
   */
  paddingSide: "left" | "right" = "left";
  /** Number of ids the tokenizer knows, added tokens included. */
  readonly vocabSize: number;
  private readonly chatTemplate: string | null;
  private readonly pieceText = new Map<number, string>();
  private anchor: { id: number; text: string } | null | undefined;

  /**
   * @param tokenizerJson parsed tokenizer.json
   * @param tokenizerConfig parsed tokenizer_config.json (`{}` if none)
   * @throws NNsightError `IO` when the library cannot build the tokenizer
   */
  /** tokenizer.json as parsed (a server hands it to remote clients) */
  readonly json: unknown;

  constructor(tokenizerJson: unknown, tokenizerConfig: Record<string, unknown> = {}, options: TokenizerOptions = {}) {
    this.json = tokenizerJson;
    try {
      this.hf = new HFTokenizer(tokenizerJson as object, tokenizerConfig);
    } catch (e) {
      throw new NNsightError("IO", `cannot build the tokenizer from tokenizer.json: ${(e as Error).message}`, {}, { cause: e });
    }
    this.config = tokenizerConfig;
    this.vocabSize = this.hf.get_vocab(true).size;
    this.bosTokenId = this.specialId("bos_token");
    const eos = this.specialId("eos_token");
    this.eosTokenIds = [...new Set([...(eos === null ? [] : [eos]), ...(options.extraEosTokenIds ?? [])])];
    this.padTokenId = this.specialId("pad_token") ?? this.eosTokenIds[0] ?? 0;
    this.chatTemplate = options.chatTemplate ?? pickChatTemplate(tokenizerConfig.chat_template);
  }

  /**
   * Load `dir/tokenizer.json` with, when present, tokenizer_config.json (merged over
   * special_tokens_map.json), chat_template.jinja, and generation_config.json's `eos_token_id`
   * (added to {@link eosTokenIds}).
   *
   * @throws NNsightError `IO` when tokenizer.json is missing or malformed, `UNSUPPORTED` when the
   *   folder only has a slow (SentencePiece `tokenizer.model`) tokenizer
   */
  static async fromDir(dir: string): Promise<Tokenizer> {
    const file = path.join(dir, "tokenizer.json");
    const json = await readJsonFile(file, true);
    if (!json) {
      const slow = await readFile(path.join(dir, "tokenizer.model")).then(() => true, () => false);
      if (slow) {
        throw new NNsightError("UNSUPPORTED", `${dir} has only a SentencePiece tokenizer.model; a tokenizer.json (fast tokenizer) is required`, { file });
      }
      throw new NNsightError("IO", `${dir} has no tokenizer.json`, { file });
    }
    const specials = (await readJsonFile(path.join(dir, "special_tokens_map.json"), true)) ?? {};
    const config = { ...specials, ...((await readJsonFile(path.join(dir, "tokenizer_config.json"), true)) ?? {}) };
    const gen = await readJsonFile(path.join(dir, "generation_config.json"), true);
    const chatTemplate = await readFile(path.join(dir, "chat_template.jinja"), "utf8").catch(() => undefined);
    return new Tokenizer(json, config, { extraEosTokenIds: idList(gen?.eos_token_id), chatTemplate });
  }

  /** Id of a special token named in tokenizer_config.json (`bos_token`, ...), or `null`. */
  specialId(key: string): number | null {
    const text = tokenText(this.config[key]);
    return text === null ? null : (this.hf.token_to_id(text) ?? null);
  }

  /** Id of a token string, or `undefined`. */
  tokenToId(token: string): number | undefined {
    return this.hf.token_to_id(token);
  }

  /** Token string of an id (the raw vocabulary piece), or `undefined`. */
  idToToken(id: number): string | undefined {
    return this.hf.id_to_token(id);
  }

  /** Encode text to ids; with `addSpecialTokens` (default true) BOS is added as HF does. */
  encode(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== "string") throw new NNsightError("BAD_INPUT", `encode: expected a string, got ${typeof text}`);
    return this.hf.encode(text, { add_special_tokens: options.addSpecialTokens ?? true }).ids;
  }

  /** Encode several texts (unpadded; see {@link pad}). */
  encodeBatch(texts: readonly string[], options: { addSpecialTokens?: boolean } = {}): number[][] {
    if (!Array.isArray(texts)) throw new NNsightError("BAD_INPUT", "encodeBatch: expected an array of strings");
    return texts.map((t) => this.encode(t, options));
  }

  /**
   * Pad id lists to one length on {@link paddingSide} with {@link padTokenId}; the mask is 1 for
   * real tokens and 0 for padding.
   */
  pad(batch: readonly (readonly number[])[]): { inputIds: number[][]; attentionMask: number[][] } {
    const len = Math.max(0, ...batch.map((r) => r.length));
    const inputIds: number[][] = [];
    const attentionMask: number[][] = [];
    for (const row of batch) {
      const fill = len - row.length;
      const padIds = new Array<number>(fill).fill(this.padTokenId);
      const zeros = new Array<number>(fill).fill(0);
      const ones = new Array<number>(row.length).fill(1);
      inputIds.push(this.paddingSide === "left" ? [...padIds, ...row] : [...row, ...padIds]);
      attentionMask.push(this.paddingSide === "left" ? [...zeros, ...ones] : [...ones, ...zeros]);
    }
    return { inputIds, attentionMask };
  }

  /**
   * Decode ids to text. Ids the vocabulary does not have are skipped (as HF's Rust tokenizer does).
   */
  decode(ids: readonly number[], options: { skipSpecialTokens?: boolean; cleanUpTokenizationSpaces?: boolean } = {}): string {
    checkIds(ids, "decode");
    const known = ids.filter((id) => this.hf.id_to_token(id) !== undefined);
    if (known.length === 0) return "";
    return this.hf.decode([...known], {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: options.cleanUpTokenizationSpaces,
    });
  }

  /**
   * Text of one token as it reads after other text: `"▁time"` gives `" time"` (a decoder's strip
   * of the leading space only applies at the start of a sequence), `"<0x0A>"` gives `"\n"`, and a
   * byte-fallback piece that is only part of a UTF-8 character gives `"\uFFFD"`; use
   * {@link streamDecoder} to stream text without splitting characters.
   */
  decodeToken(id: number): string {
    checkIds([id], "decodeToken");
    let text = this.pieceText.get(id);
    if (text === undefined) {
      text = this.decodeAfterAnchor(id);
      this.pieceText.set(id, text);
    }
    return text;
  }

  private decodeAfterAnchor(id: number): string {
    if (this.hf.id_to_token(id) === undefined) return "";
    if (this.anchor === undefined) {
      const ids = this.encode("a", { addSpecialTokens: false });
      this.anchor = ids.length === 1 ? { id: ids[0]!, text: this.decode(ids, { cleanUpTokenizationSpaces: false }) } : null;
    }
    const a = this.anchor;
    if (a) {
      const both = this.decode([a.id, id], { cleanUpTokenizationSpaces: false });
      if (both.startsWith(a.text)) return both.slice(a.text.length);
    }
    return this.decode([id], { cleanUpTokenizationSpaces: false });
  }

  /** A decoder that turns ids, pushed one at a time, into text without splitting characters. */
  streamDecoder(options: { skipSpecialTokens?: boolean } = {}): TokenStreamDecoder {
    return new TokenStreamDecoder(this, options.skipSpecialTokens ?? false);
  }

  /** Does this tokenizer have a chat template? */
  get hasChatTemplate(): boolean {
    return this.chatTemplate !== null;
  }

  /**
   * Render messages with the chat template, as HF's `apply_chat_template(tokenize=False)` does.
   * Encode the result with `addSpecialTokens: false` (the template writes BOS itself), or use
   * {@link encodeChat}.
   *
   * @throws NNsightError `BAD_INPUT` when there is no template, the messages are malformed, or
   *   the template raises
   */
  applyChatTemplate(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): string {
    if (this.chatTemplate === null) {
      throw new NNsightError(
        "BAD_INPUT",
        "this tokenizer has no chat template (no chat_template in tokenizer_config.json and no chat_template.jinja); format the prompt yourself",
      );
    }
    if (!Array.isArray(messages) || messages.some((m) => !m || typeof m.role !== "string" || typeof m.content !== "string")) {
      throw new NNsightError("BAD_INPUT", "applyChatTemplate: expected an array of { role: string, content: string }");
    }
    const specials: Record<string, string> = {};
    for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
      const t = tokenText(this.config[key]);
      if (t !== null) specials[key] = t;
    }
    try {
      return new Template(this.chatTemplate).render({
        ...specials,
        ...options.extra,
        messages,
        add_generation_prompt: options.addGenerationPrompt ?? false,
      });
    } catch (e) {
      throw new NNsightError("BAD_INPUT", `chat template failed: ${(e as Error).message}`, {}, { cause: e });
    }
  }

  /** {@link applyChatTemplate}, then encode without adding special tokens. */
  encodeChat(messages: readonly ChatMessage[], options: ChatTemplateOptions = {}): number[] {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }
}

/**
 * Incremental detokenizer: `push(id)` returns the text that became final. It decodes a short
 * window of recent ids and emits the difference, holding text back while it ends in an
 * incomplete UTF-8 sequence (a trailing U+FFFD), so the concatenated output equals the decode
 * of all ids.
 */
export class TokenStreamDecoder {
  private ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;

  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly skipSpecialTokens: boolean,
  ) {}

  private text(from: number, to: number): string {
    return this.tokenizer.decode(this.ids.slice(from, to), { skipSpecialTokens: this.skipSpecialTokens, cleanUpTokenizationSpaces: false });
  }

  /** Add one id; returns the new text (possibly empty). */
  push(id: number): string {
    this.ids.push(id);
    const prefix = this.text(this.prefixOffset, this.readOffset);
    const full = this.text(this.prefixOffset, this.ids.length);
    if (full.length > prefix.length && !full.endsWith("\uFFFD")) {
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      this.compact();
      return full.slice(prefix.length);
    }
    return "";
  }

  /** Text still held back (an incomplete character at the end), emitted as it decodes. */
  flush(): string {
    const prefix = this.text(this.prefixOffset, this.readOffset);
    const full = this.text(this.prefixOffset, this.ids.length);
    this.prefixOffset = this.readOffset = this.ids.length;
    return full.length > prefix.length ? full.slice(prefix.length) : "";
  }

  private compact(): void {
    if (this.prefixOffset < 64) return;
    this.ids = this.ids.slice(this.prefixOffset);
    this.readOffset -= this.prefixOffset;
    this.prefixOffset = 0;
  }
}
