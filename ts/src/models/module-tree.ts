/**
 * The module tree of a model, built from its config before any weight loads (so `model.model.layers[5]`
 * exists at once, as in NNsight). Paths and names follow Hugging Face exactly:
 * `model.layers.3.self_attn.q_proj` (Llama), `transformer.h.3.attn.c_attn` (GPT-2).
 */
import type { ModelConfig } from "./config.js";

export interface ModuleSpec {
  /** attribute name in the parent (`"q_proj"`, `"3"`) */
  name: string;
  /** full dotted path from the root (`"model.layers.3.self_attn"`); the root is `""` */
  path: string;
  /** the HF class name (`"LlamaDecoderLayer"`) */
  type: string;
  children: ModuleSpec[];
  /** true for list containers (`layers`, `h`): children are indexed 0..n-1 */
  isList?: boolean;
  /**
   * child names in the order the forward pass calls them, when it differs from `children`; operations of
   * the module's own forward appear as `"source.<name>"`
   */
  forwardOrder?: string[];
  /**
   * Operations inside the module's forward that are hook points too (`envoy.source.attention_interface_0`),
   * named as NNsight names them (function name + call index). Paths are `<module path>.source.<name>`.
   */
  source?: ModuleSpec[];
}

const leaf = (name: string, type: string, children: ModuleSpec[] = [], isList = false): ModuleSpec => ({
  name,
  path: "",
  type,
  children,
  isList,
});

const op = (name: string, source?: ModuleSpec[]): ModuleSpec =>
  source ? { name, path: "", type: "Operation", children: [], source, forwardOrder: source.map((o) => `source.${o.name}`) } : { name, path: "", type: "Operation", children: [] };

/**
 * `attention_interface_0` and the operations inside it (`.source` of the source operation, as NNsight's
 * recursive source), after HF's `sdpa_attention_forward` or `eager_attention_forward`:
 * - sdpa: `torch_nn_functional_scaled_dot_product_attention_0`: inputs q [B, Hq, T, hd] and k, v
 *   [B, Hkv, Tk, hd] (the KV cache included); output [B, Hq, T, hd].
 * - eager: `torch_matmul_0` (q times the transposed keys repeated over the query heads: raw scores
 *   [B, Hq, T, Tk]), `nn_functional_softmax_0` (input: scaled scores plus the mask, -inf where a key is
 *   hidden; output: the attention probabilities [B, Hq, T, Tk]) and `torch_matmul_1` (probabilities times
 *   the repeated values: [B, Hq, T, hd]).
 */
function attentionInterface(cfg: ModelConfig): ModuleSpec {
  return cfg.attnImplementation === "eager"
    ? op("attention_interface_0", [op("torch_matmul_0"), op("nn_functional_softmax_0"), op("torch_matmul_1")])
    : op("attention_interface_0", [op("torch_nn_functional_scaled_dot_product_attention_0")]);
}

/** Fill in every node's full path from the names (the root's path is ""). */
function assignPaths(m: ModuleSpec, parent: string): ModuleSpec {
  const path = parent === "" ? m.name : `${parent}.${m.name}`;
  const out: ModuleSpec = { ...m, path, children: m.children.map((c) => assignPaths(c, path)) };
  if (m.source) out.source = m.source.map((o) => assignPaths(o, `${path}.source`));
  return out;
}

export function buildModuleTree(cfg: ModelConfig): ModuleSpec {
  if (cfg.modelType === "gpt2") {
    const block = (i: number) =>
      leaf(String(i), "GPT2Block", [
        leaf("ln_1", "LayerNorm"),
        {
          ...leaf("attn", "GPT2Attention", [leaf("c_attn", "Conv1D"), leaf("c_proj", "Conv1D")]),
          source: [attentionInterface(cfg)],
          forwardOrder: ["c_attn", "source.attention_interface_0", "c_proj"],
        },
        leaf("ln_2", "LayerNorm"),
        { ...leaf("mlp", "GPT2MLP", [leaf("c_fc", "Conv1D"), leaf("c_proj", "Conv1D")]), source: [op("act_0")], forwardOrder: ["c_fc", "source.act_0", "c_proj"] },
      ]);
    const transformer = leaf("transformer", "GPT2Model", [
      leaf("wte", "Embedding"),
      leaf("wpe", "Embedding"),
      leaf("h", "ModuleList", Array.from({ length: cfg.numLayers }, (_, i) => block(i)), true),
      leaf("ln_f", "LayerNorm"),
    ]);
    return assignPaths(leaf("", "GPT2LMHeadModel", [transformer, leaf("lm_head", "Linear")]), "");
  }
  const layer = (i: number) => ({
    ...leaf(String(i), "LlamaDecoderLayer", [
      {
        ...leaf("self_attn", "LlamaAttention", [leaf("q_proj", "Linear"), leaf("k_proj", "Linear"), leaf("v_proj", "Linear"), leaf("o_proj", "Linear")]),
        source: [op("apply_rotary_pos_emb_0"), attentionInterface(cfg)],
        forwardOrder: ["q_proj", "k_proj", "v_proj", "source.apply_rotary_pos_emb_0", "source.attention_interface_0", "o_proj"],
      },
      {
        ...leaf("mlp", "LlamaMLP", [leaf("gate_proj", "Linear"), leaf("up_proj", "Linear"), leaf("down_proj", "Linear")]),
        source: [op("act_fn_0")],
        forwardOrder: ["gate_proj", "source.act_fn_0", "up_proj", "down_proj"],
      },
      leaf("input_layernorm", "LlamaRMSNorm"),
      leaf("post_attention_layernorm", "LlamaRMSNorm"),
    ]),
    forwardOrder: ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp"],
  });
  const model = leaf("model", "LlamaModel", [
    leaf("embed_tokens", "Embedding"),
    leaf("layers", "ModuleList", Array.from({ length: cfg.numLayers }, (_, i) => layer(i)), true),
    leaf("norm", "LlamaRMSNorm"),
  ]);
  return assignPaths(leaf("", "LlamaForCausalLM", [model, leaf("lm_head", "Linear")]), "");
}

/** Every module path in forward (pre-)order, root first. */
export function allPaths(root: ModuleSpec): string[] {
  const out: string[] = [];
  const walk = (m: ModuleSpec) => {
    out.push(m.path);
    m.children.forEach(walk);
  };
  walk(root);
  return out;
}

/**
 * Hook events in the order one forward pass fires them: each module's input event before its children's,
 * its output event after them. Keys are `path + "\0" + kind` with kind "input" or "output".
 */
export function eventOrder(root: ModuleSpec): Map<string, number> {
  const order = new Map<string, number>();
  let n = 0;
  const visit = (m: ModuleSpec) => {
    order.set(`${m.path}\0input`, n++);
    const kids = m.forwardOrder
      ? m.forwardOrder.map((name) => (name.startsWith("source.") ? m.source!.find((o) => `source.${o.name}` === name)! : m.children.find((c) => c.name === name)!))
      : m.children;
    for (const c of kids) visit(c);
    order.set(`${m.path}\0output`, n++);
  };
  visit(root);
  return order;
}
