"""Lesson 10: your Hugging Face model, sharded from the plans it already carries.

``models.hf.load`` builds a ``transformers`` model (a built-in name with the published
config, a folder, a config or a model you built) and annotates it from HF's own plans:
``config.base_model_tp_plan`` says which linears are ``colwise`` (they become
``('heads'|'mlp', 'embed')``: column-parallel) and ``rowwise`` (``('embed', ...)``: row-
parallel); the ep plan marks the experts ``('experts', None, None)``; the pp plan names
the layer stack. Activation constraints ``('batch', 'seq', 'embed')`` go at the input and
output of every layer, attention block and MLP, attached from outside with
``sl.annotate(model, params, inputs=..., outputs=...)``: the model's code is HF's,
unchanged. Everything below is a tiny config (hidden 64, 2 layers) on a CPU. You will see:

  (a) a Llama loaded by name with small overrides, and what the plan annotated;
  (b) tp=2: Megatron's minimum, 13 all-reduces for 2 layers, the analytic bytes, and
      every rank matching one device;
  (c) seq -> sp: HF's attention runs as shardlang's ring attention, passing blocks of
      only the 2 key/value heads (grouped-query attention);
  (d) Mixtral on ep=2: 2 + 2 all-to-alls per MoE layer, and the router's statistics;
  (e) OPT, which HF gives no plan: it runs unannotated on dp (and pp, sp), tp=2 is the
      error, then the annotation by hand, and how the all-reduce count tells you
      whether that annotation is complete.

Run it:  python tutorials/10_your_hugging_face_model.py
"""

from __future__ import annotations

import collections
import functools
import textwrap

import torch
from transformers import OPTConfig, OPTForCausalLM

import models.hf
import shardlang as sl
from lowering.run import Layout, explain, simulate
from lowering.run.registry import ModelRef
from lowering.schedule import Record

SMALL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
L, H = SMALL["num_hidden_layers"], SMALL["hidden_size"]
# a Layout takes a factory: the same load call (on the command line: hf:llama-3-8b --config)
LLAMA = ModelRef("llama", functools.partial(models.hf.load, "llama-3-8b", **SMALL))
MIXTRAL = ModelRef("mixtral", functools.partial(
    models.hf.load, "mixtral-8x7b", **SMALL, num_local_experts=4, num_experts_per_tok=2))
ACT = ("batch", "seq", "embed")
F32 = 4
MEGATRON = 2 * L + 2 * L + 1 + 1 + 3  # g and f per layer; embedding, head input, loss


def header(title: str) -> None:
    print(f"\n{'=' * 78}\n{title}\n{'=' * 78}")


def tp_records(layout: Layout) -> tuple[list, float]:
    """Rank 0's tp collectives and the analytic tp wire bytes."""
    ex = explain(layout, ranks=[0])
    return [r for r in ex.schedules.ranks[0] if r.axis == "tp"], ex.analytic["tp"].wire_bytes


def row(r: Record) -> str:
    return (f"  {r.index:2} {r.phase.value:8} {r.op.value:10} over {r.axis} {r.site:28} "
            f"{str(list(r.shape)):17} {r.bytes:>7,} B")


def check_parity(name: str, layout: Layout, steps: int) -> dict:
    result, parity = simulate(layout, steps=steps, check=True)
    assert parity is not None
    for step, losses in enumerate(result.losses):
        print(f"  step {step}: loss per rank {', '.join(f'{v:.6f}' for v in losses)}")
    print(f"{name} on {layout.mesh!r}: parity ok = {parity.ok}\n  {parity.lines[0]}")
    if not parity.ok:
        raise SystemExit(f"{name}: a rank does NOT match the single-device model")
    return result.metrics[0]


def section_a() -> None:
    header("(a) A Hugging Face Llama, loaded by name and annotated from its own plans")
    m = models.hf.load("llama-3-8b", **SMALL)
    ids = torch.zeros(2, 8, dtype=torch.long)
    print(f'models.hf.load("llama-3-8b", num_hidden_layers=2, hidden_size=64, ...) -> '
          f"{type(m).__name__},\n{sum(p.numel() for p in m.parameters()):,} parameters; "
          f"m(ids) with ids {tuple(ids.shape)} -> logits {tuple(m(ids).shape)}")
    print("config.base_model_tp_plan, HF's own (paths relative to m.model):")
    for path, style in m.config.base_model_tp_plan.items():
        print(f"  {path:28} {style}")
    ex = explain(Layout(LLAMA, sl.Mesh(tp=2)), ranks=[0])
    print(f"What that became: explain(...).plan.params on Mesh(tp=2), 8 of {len(ex.plan.params)}:")
    show = ("embed_tokens.", "layers.0.self_attn.q_proj.", "layers.0.self_attn.k_proj.",
            "layers.0.self_attn.o_proj.", "layers.0.mlp.gate_proj.", "layers.0.mlp.down_proj.",
            "layers.0.input_layernorm.", "lm_head.")
    for p in ex.plan.params:
        if any(p.name.startswith(s) or p.name.startswith(f"model.{s}") for s in show):
            print(f"  {p.name:40} {str(p.shape):10} {str(p.axes):19} {p.spec!r:15} "
                  f"{p.role.value}")
    print("colwise -> ('heads'|'mlp', 'embed'): 'heads' in an attention block, 'mlp' elsewhere;")
    print("rowwise -> ('embed', 'heads'|'mlp'); embedding and head ('vocab', 'embed'); norms")
    print(f"unannotated: replicated. model.layers, base_model_pp_plan's stack: "
          f"{sl.logical_axes(m.model.layers)}.")
    print("Activation constraints (sl.activation_axes), layer 0 and the head:")
    for path, mod in m.named_modules():
        ins, outs = sl.activation_axes(mod)
        if (ins or outs) and not path.startswith("model.layers.1"):
            print(f"  {path:30} input {str(ins):26} output {outs}")
    print("A module that owns a column-parallel linear gets its input constrained, one that")
    print("owns a row-parallel linear its output: Megatron's conversion points, put there from")
    print("outside by sl.annotate(m, params, inputs=..., outputs=...).")


def section_b() -> None:
    layout = Layout(LLAMA, sl.Mesh(tp=2))
    header(f"(b) {layout.mesh!r}: Megatron's minimum and the analytic bytes")
    recs, analytic = tp_records(layout)
    b, s = layout.shapes(LLAMA.build(meta=True))
    print(f"rank 0's tp collectives, batch {b} x seq {s} (as python -m lowering explain "
          "hf:llama-3-8b")
    print("--config num_hidden_layers=2,hidden_size=64,... --mesh tp=2 prints them):")
    for r in recs:
        print(row(r))
    print(f"{len(recs)} all-reduces = 2 forward (attention and MLP outputs: g) + 2 backward "
          f"(their inputs: f)\n  x {L} layers + 1 embedding + 1 head input gradient + 3 for the "
          f"vocab-parallel loss = {MEGATRON}")
    print("(layer 0's two backward ones are reported at the stack, model.layers)")
    ok = len(recs) == MEGATRON and {r.op.value for r in recs} == {"all_reduce"}
    got = sum(r.wire_bytes for r in recs)
    hand = (4 * L + 2) * b * s * H * F32 + 3 * b * s * F32
    print(f"Megatron's minimum, nothing gathered: {'yes' if ok else 'NO'}")
    print(f"wire bytes: recorded {got:,.0f} B, ex.analytic['tp'] {analytic:,.0f} B,")
    print(f"  by hand ({4 * L + 2}*b*s*h + 3*b*s)*4 = {hand:,} B (2(n-1)/n = 1 on 2 ranks)")
    if not ok or not got == analytic == hand:
        raise SystemExit("the tp schedule is not Megatron's minimum")
    check_parity("llama", layout, steps=2)


def section_c() -> None:
    layout = Layout(LLAMA, sl.Mesh(sp=2), load_balance=True)
    n = layout.mesh.sp
    header(f"(c) seq -> sp on {layout.mesh!r}, load_balance=True: HF attention as ring attention")
    ex = explain(layout, ranks=[0])
    b, s = layout.shapes(LLAMA.build(meta=True))
    perms = [r for r in ex.schedules.ranks[0] if r.op.value == "permute"]
    for r in perms:
        print(row(r))
    heads, kv = SMALL["num_attention_heads"], SMALL["num_key_value_heads"]
    d = H // heads
    kv_bytes = 2 * b * kv * (s // n) * d * F32
    print("Each permute passes this rank's K and V blocks to its ring neighbour: shape")
    print(f"(2 = K and V, batch {b}, kv heads {kv}, seq/sp {s // n}, head_dim {d}) = "
          f"2*{b}*{kv}*{s // n}*{d}*4 = {kv_bytes:,} B;")
    print(f"sp-1 = {n - 1} ring step per layer, forward and backward. Grouped-query attention: "
          f"{heads} query")
    print(f"heads share {kv} key/value heads: the ring carries {kv} heads, {kv}/{heads} of what "
          "multi-head attention would.")
    ok = len(perms) == 2 * L and all(r.bytes == kv_bytes for r in perms)
    rest = collections.Counter(r.op.value for r in ex.schedules.ranks[0] if r not in perms)
    print(f"The rest: {dict(rest)} (the gradients, summed over sp in buckets as DDP "
          f"packs them: all of them fit its first, 1 MiB). As expected: {'yes' if ok else 'NO'}")
    c = s // (2 * n)
    print("Rotary takes positions from sl.positions: load balancing gives rank r chunks r and "
          f"2*sp-1-r\nof {2 * n}: rank 0 holds tokens 0-{c - 1} and {s - c}-{s - 1}.")
    if not ok:
        raise SystemExit("the ring does not carry the key/value heads")
    check_parity("llama", layout, steps=1)


def section_d() -> None:
    layout = Layout(MIXTRAL, sl.Mesh(ep=2))
    n = layout.mesh.ep
    header(f"(d) Mixtral (4 experts, top-2) on {layout.mesh!r}: tokens move, not weights")
    ex = explain(layout, ranks=[0])
    for p in ex.plan.params:
        if p.name.startswith("model.layers.0.mlp."):
            print(f"  {p.name:39} {str(p.shape):12} {str(p.axes):24} {p.spec!r}")
    b, s = layout.shapes(MIXTRAL.build(meta=True))
    X, T = 4, b // n * s
    payload = X * T * H * F32
    a2a = [r for r in ex.schedules.ranks[0] if r.op.value == "all_to_all"]
    for r in a2a:
        print(row(r) + f", wire {r.wire_bytes:,.0f} B")
    fwd = sum(r.phase.value == "forward" for r in a2a)
    print(f"{fwd} forward + {len(a2a) - fwd} backward = 2 + 2 per MoE layer x {L} MoE layers: "
          "dispatch sends each expert")
    print(f"its tokens, combine brings the results back. The buffer: {X} experts x C slots x "
          f"{H} x 4 B,")
    print(f"C = T = {T} (this rank's tokens: nothing is dropped) = {payload:,} B; a rank keeps")
    print(f"its own half and sends (ep-1)/ep of it = {payload * (n - 1) // n:,} B.")
    if (fwd, len(a2a)) != (2 * L, 4 * L) or any(r.bytes != payload for r in a2a):
        raise SystemExit("not 2 + 2 all-to-alls per MoE layer")
    stats = check_parity("mixtral", layout, steps=1)
    for layer in range(L):
        tpe = [int(v) for v in stats[f"moe{layer}.tokens_per_expert"]]
        print(f"  moe{layer}.tokens_per_expert {tpe} (sum {sum(tpe)} = {b}*{s} tokens x top-2), "
              f"dropped {int(stats[f'moe{layer}.dropped'])}, "
              f"balance {stats[f'moe{layer}.balance']:.4f}")
    print("Router statistics, psum'd over the token axes: balance is 1.0 when perfectly even.")


def opt_config() -> OPTConfig:
    """A tiny OPT. Dropout off: load turns it off for a name or a config, but not inside a
    model you built, and the parity check needs the same arithmetic on every layout."""
    return OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                     vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=256,
                     dropout=0.0, attention_dropout=0.0)


def opt_annotated(attention_output: bool) -> torch.nn.Module:
    """OPT annotated by hand as the error message says (``attention_output=False``: without
    the constraint on the attention's output, to see what it buys)."""
    model = OPTForCausalLM(opt_config())
    layer = "model.decoder.layers.*"
    outputs = {layer: ACT, f"{layer}.self_attn": ACT} if attention_output else {layer: ACT}
    sl.annotate(model, {
        **{f"{layer}.self_attn.{n}_proj.weight": ("heads", "embed") for n in "qkv"},
        **{f"{layer}.self_attn.{n}_proj.bias": ("heads",) for n in "qkv"},
        f"{layer}.self_attn.out_proj.weight": ("embed", "heads"),
        f"{layer}.fc1.weight": ("mlp", "embed"), f"{layer}.fc1.bias": ("mlp",),
        f"{layer}.fc2.weight": ("embed", "mlp"),
        "model.decoder.embed_tokens.weight": ("vocab", "embed"),  # lm_head is tied to it
        "model.decoder.layers": ("layers",),
    }, inputs={layer: ACT}, outputs=outputs)
    return models.hf.load(model)


def section_e() -> None:
    header("(e) OPT: no plan in transformers, so you annotate it for tp")
    opt = ModelRef("opt", functools.partial(models.hf.load, opt_config()))
    print("models.hf.load(OPTConfig(...)) annotates what needs no plan: the embeddings, the")
    print("layer stack. Every axis but tp runs it as it is:")
    check_parity("opt", Layout(opt, sl.Mesh(dp=2), sl.Rules.default(), fsdp=True), steps=2)
    try:
        explain(Layout(opt, sl.Mesh(tp=2)), ranks=[0])
    except sl.ShardingError as e:
        print("\non Mesh(tp=2), explain raises sl.ShardingError:")
        print(textwrap.indent(textwrap.fill(str(e), 92, break_on_hyphens=False), "  "))
    else:
        raise SystemExit("OPT ran on tp=2 without a plan")
    print("\nopt_annotated() in this file does that: q/k/v and fc1 column-parallel, out_proj and")
    print("fc2 row-parallel, the (tied) embedding vocab-parallel, the stack 'layers', each")
    print("layer's input and output ('batch', 'seq', 'embed') and, as the message suggests, the")
    print("attention's output too; models.hf.load(model) keeps them. First without that one:")
    seen = {}
    for attention_output in (False, True):
        ref = ModelRef(f"opt_annotated(attention_output={attention_output})",
                       functools.partial(opt_annotated, attention_output))
        recs, analytic = tp_records(Layout(ref, sl.Mesh(tp=2)))
        by = collections.Counter(r.phase.value for r in recs)
        seen[attention_output] = len(recs), sum(r.wire_bytes for r in recs), analytic, recs
        print(f"{ref.name} on tp=2: {len(recs)} all-reduces ({by['forward']} forward, "
              f"{by['backward']} backward),")
        print(f"  recorded {seen[attention_output][1]:,.0f} B, analytic {analytic:,.0f} B")
    (n0, got0, _, recs0), (n1, got1, analytic, _) = seen[False], seen[True]
    print(f"The layers alone: {n0 - MEGATRON} backward all-reduces above Megatron's "
          f"{MEGATRON}, {got0 - analytic:,.0f} B above the formula.")
    sites = ", ".join(r.site for r in recs0 if r.phase.value == "forward" and r.site != "loss")
    print(textwrap.fill(f"Their forward sites (the loss's 3 aside): {sites}", 92))
    print("Then the attention's output is a partial sum (out_proj is row-parallel): DTensor")
    print("makes the residual add partial too and reduces at the next norm, final_layer_norm;")
    print("the backward of that detour costs one more all-reduce per layer. Constrain the block")
    print("that owns the row-parallel linear (self_attn's output), as models.hf.plans does for")
    print(f"Llama: {n1}. fc1 and fc2 sit in the layer itself, on a (batch*seq, embed) view: the")
    print("layer's own input and output are the MLP's conversion points.")
    if not (n1 == MEGATRON and got1 == analytic):
        raise SystemExit("OPT annotated by hand is not at Megatron's minimum")
    check_parity("opt_annotated(attention_output=True)", Layout(ModelRef(
        "opt", functools.partial(opt_annotated, True)), sl.Mesh(tp=2)), steps=2)


def main() -> None:
    for section in (section_a, section_b, section_c, section_d, section_e):
        section()


if __name__ == "__main__":
    main()
