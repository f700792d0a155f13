"""Annotations for a Hugging Face model, derived from its own parallelism plans.

HF configs carry ``base_model_tp_plan`` (``"layers.*.self_attn.q_proj": "colwise"``, ...),
``base_model_pp_plan`` (the layer stack and what flows in and out of it) and, for MoE,
``base_model_ep_plan``. They become shardlang annotations:

| HF plan entry                          | logical axes                                          |
|----------------------------------------|-------------------------------------------------------|
| ``colwise`` linear in an attention     | weight ``("heads", "embed")``, bias ``("heads",)``    |
| ``colwise`` linear elsewhere           | weight ``("mlp", "embed")``, bias ``("mlp",)``        |
| ``rowwise`` linear                     | weight ``("embed", "heads" or "mlp")``                |
| experts' 3-D parameters (ep plan)      | ``("experts", None, None)``                           |
| the input and output embeddings        | ``("vocab", "embed")`` (vocab-parallel), bias ``("vocab",)`` |
| the pp plan's layer stack              | ``("layers",)``                                       |

plus activation constraints: the first input of every module that owns a column-parallel
linear, the first output of every module that owns a row-parallel one (an attention
block, an MLP, an MoE block), every layer of the stack and the head's input are
``("batch", "seq", "embed")``. Those are Megatron's conversion points: 2 all-reduces forward and 2 backward
per layer. Packed projections (``packed_colwise``: gate and up in one weight) stay
replicated, as HF's ``colwise_gather_output`` would gather them.

Architectures without plans get one from :data:`TABLE` (GPT-2, BERT). GPT-2's
transposed ``Conv1D`` layers become ``nn.Linear`` and its fused ``c_attn`` three linears
(:class:`Packed`), recorded in :func:`sources` so checkpoint weights still find their place.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import shardlang as sl
from shardlang.annotate import no_tensor_split
from models.hf.experts import is_experts

__all__ = ["TABLE", "Source", "Packed", "Parts", "annotate_hf", "sources", "layer_stack_path"]

_ACT: sl.Axes = ("batch", "seq", "embed")
_COLUMN = {"colwise", "local_colwise", "colwise_gather_output", "colwise_rep"}
_ROW = {"rowwise", "local_rowwise", "rowwise_split_input", "rowwise_rep"}
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class Table:
    """A plan for an architecture HF gives none (paths relative to the base model)."""

    tp_plan: Mapping[str, str]
    stack: str                                   # the layer stack
    packed: Mapping[str, int] = field(default_factory=dict)  # fused linear -> parts


TABLE: dict[str, Table] = {
    "gpt2": Table(tp_plan={"h.*.attn.c_attn.*": "colwise", "h.*.attn.c_proj": "rowwise",
                           "h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
                  stack="h", packed={"h.*.attn.c_attn": 3}),
    "bert": Table(tp_plan={"encoder.layer.*.attention.self.query": "colwise",
                           "encoder.layer.*.attention.self.key": "colwise",
                           "encoder.layer.*.attention.self.value": "colwise",
                           "encoder.layer.*.attention.output.dense": "rowwise",
                           "encoder.layer.*.intermediate.dense": "colwise",
                           "encoder.layer.*.output.dense": "rowwise"},
                  stack="encoder.layer"),
}


# -- module surgery (recorded, so checkpoints still load) --------------------------------------
@dataclass(frozen=True)
class Source:
    """Where a parameter's values are in the original checkpoint: the key, whether it is
    stored transposed (``Conv1D``), and which rows of it (a part of a fused weight)."""

    key: str
    transposed: bool = False
    rows: tuple[int, int] | None = None


class Parts(tuple):
    """What :class:`Packed` returns: its parts. ``.split(size, dim)`` (what the model does
    with a fused projection's output) gives them back without concatenating them."""

    def split(self, size: int, dim: int = -1) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        if all(p.shape[dim] == size for p in self):
            return tuple(self)
        return torch.cat(tuple(self), dim).split(size, dim)


class Packed(nn.ModuleList):
    """A fused linear (GPT-2's ``c_attn``: q, k and v in one) as separate linears, so each
    can be column-parallel on its own."""

    def forward(self, x: torch.Tensor) -> Parts:
        return Parts(part(x) for part in self)


def _linear_from_conv(conv: Conv1D) -> nn.Linear:
    n_in, n_out = conv.weight.shape
    lin = nn.Linear(n_in, n_out, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return lin


def _set(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _convert(model: nn.Module, base: str, table: Table | None) -> dict[str, Source]:
    """Conv1D -> Linear, fused linears -> :class:`Packed`; the sources of what moved."""
    found: dict[str, Source] = {}
    for path, mod in list(model.named_modules()):
        if isinstance(mod, Conv1D):
            _set(model, path, _linear_from_conv(mod))
            found[f"{path}.weight"] = Source(f"{path}.weight", transposed=True)
            found[f"{path}.bias"] = Source(f"{path}.bias")
    for pattern, n in (table.packed.items() if table else ()):
        for path, mod in list(model.named_modules()):
            if not (isinstance(mod, nn.Linear) and _matches(path, base, pattern)):
                continue
            rows = mod.out_features // n
            parts = Packed(nn.Linear(mod.in_features, rows, bias=mod.bias is not None,
                                     device=mod.weight.device, dtype=mod.weight.dtype)
                           for _ in range(n))
            for i, part in enumerate(parts):
                with torch.no_grad():
                    part.weight.copy_(mod.weight[i * rows:(i + 1) * rows])
                    if mod.bias is not None:
                        part.bias.copy_(mod.bias[i * rows:(i + 1) * rows])
                for kind in ("weight", "bias"):
                    src = found.get(f"{path}.{kind}", Source(f"{path}.{kind}"))
                    found[f"{path}.{i}.{kind}"] = Source(src.key, src.transposed and kind == "weight",
                                                         (i * rows, (i + 1) * rows))
            found.pop(f"{path}.weight", None), found.pop(f"{path}.bias", None)
            _set(model, path, parts)
    return found


def sources(model: nn.Module) -> dict[str, Source]:
    """Parameter name -> where it lives in the model's original checkpoint (for every
    parameter that module surgery moved; the rest keep their names)."""
    return dict(getattr(model, "_shardlang_sources", {}))


# -- plans -> annotations --------------------------------------------------------------------
def _matches(path: str, base: str, pattern: str) -> bool:
    rel = path[len(base) + 1:] if base and path.startswith(f"{base}.") else (
        None if base else path)
    return rel is not None and fnmatch.fnmatchcase(rel, pattern) and (
        pattern.count(".") == rel.count("."))


def _base(model: nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and hasattr(model, prefix) else ""


def _plans(model: nn.Module) -> tuple[dict[str, str], dict[str, str], Table | None]:
    config = getattr(model, "config", None)
    table = TABLE.get(getattr(config, "model_type", ""))
    tp = dict(getattr(config, "base_model_tp_plan", None) or (table.tp_plan if table else {}))
    ep = dict(getattr(config, "base_model_ep_plan", None) or {})
    return tp, ep, table


def layer_stack_path(model: nn.Module) -> str | None:
    """The layer stack: the pp plan's entry that takes ``hidden_states`` (or the table's),
    else the model's heaviest ``nn.ModuleList`` (an architecture without a pp plan; the
    pipeline checks at run time that its layers chain)."""
    config = getattr(model, "config", None)
    base = _base(model)
    pp = getattr(config, "base_model_pp_plan", None) or {}
    table = TABLE.get(getattr(config, "model_type", ""))
    names = [k for k, (ins, _) in pp.items() if "hidden_states" in ins] or (
        [table.stack] if table else [])
    for name in names:
        path = f"{base}.{name}" if base else name
        try:
            if isinstance(model.get_submodule(path), (nn.ModuleList, nn.Sequential)):
                return path
        except AttributeError:
            continue
    heaviest = _heaviest_stack(model)
    return heaviest[0] if heaviest is not None else None


def _heaviest_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` holding the most parameters (the decoder layers), or None."""
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        return None
    return max(stacks, key=lambda s: sum(p.numel() for p in s[1].parameters()))


def _linear_axes(path: str, style: str, mod: nn.Linear) -> dict[str, sl.Axes]:
    inner = "heads" if _ATTENTION.search(path) else "mlp"
    if style in _COLUMN:
        return {"weight": (inner, "embed"), "bias": (inner,)}
    return {"weight": ("embed", inner)}


def _annotated(model: nn.Module) -> bool:
    return any(sl.logical_axes(p) is not None for p in model.parameters()) or any(
        sl.logical_axes(m) is not None for m in model.modules())


def _no_plan(model: nn.Module) -> str:
    """What to do for an architecture with no plan, with this model's own module paths."""
    arch = f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')})"
    heaviest = _heaviest_stack(model)
    if heaviest is None:
        where = "print(model) shows its module paths"
        example = "{'PATH.TO.q_proj.weight': ('heads', 'embed'), ...}"
    else:
        stack, layers = heaviest
        linears = [n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)]
        attn = [n for n in linears if _ATTENTION.search(n)]
        q = next((n for n in attn if re.search(r"(^|[._])(q|query)", n)), attn[0] if attn else None)
        o = next((n for n in attn if re.search(r"out|o_proj|dense", n)), attn[-1] if attn else None)
        example = "{" + "".join(
            f"'{stack}.*.{n}.weight': {axes}, " for n, axes in
            ((q, ('heads', 'embed')), (o, ('embed', 'heads'))) if n) + f"..., '{stack}': ('layers',)}}"
        act = "('batch', 'seq', 'embed')"
        blocks = [n for n, m in layers[0].named_children() if _ATTENTION.search(n)
                  and any(isinstance(c, nn.Linear) for c in m.modules())]
        outs = "".join(f", '{stack}.*.{n}': {act}" for n in blocks)  # reduce before the residual
        example += f", inputs={{'{stack}.*': {act}}}, outputs={{'{stack}.*': {act}{outs}}}"
        where = f"its layer stack is {stack}; each layer's linears are {', '.join(linears)}"
    return (f"{arch} has no tensor-parallel plan (config.base_model_tp_plan) and no shardlang "
            f"table entry, so shardlang cannot tell which linears to split over tp ({where}); "
            "dp, FSDP, pp and sp need no plan. For tp, annotate the model yourself and "
            f"pass it in: sl.annotate(model, {example}); "
            "models.hf.load(model) (column splits ('heads'|'mlp', 'embed'), row splits "
            "('embed', 'heads'|'mlp'))")


def annotate_hf(model: nn.Module) -> nn.Module:
    """Annotate a HF model in place from its plans (see this module's doc)."""
    tp, ep, table = _plans(model)
    base = _base(model)
    if not tp and not ep:
        if _annotated(model):
            return model  # annotated by the user (sl.annotate) before models.hf.load(model)
        no_tensor_split(model, _no_plan(model))  # the embeddings and the stack, below
    object.__setattr__(model, "_shardlang_sources", _convert(model, base, table))
    params: dict[str, sl.Axes] = {}
    inputs: dict[str, sl.Axes] = {}
    outputs: dict[str, sl.Axes] = {}
    modules = dict(model.named_modules())
    for path, mod in modules.items():
        parent = path.rpartition(".")[0]
        style = next((s for p, s in tp.items() if _matches(path, base, p)), None)
        if isinstance(mod, nn.Linear) and (style in _COLUMN or style in _ROW):
            for kind, axes in _linear_axes(path, style, mod).items():
                if getattr(mod, kind, None) is not None:
                    params[f"{path}.{kind}"] = axes
            if style in _COLUMN:
                inputs[parent] = _ACT
            else:  # the linear's own output: its parent may add a residual and norm first
                outputs[parent] = outputs[path] = _ACT
        if is_experts(mod) and (ep or style is not None):
            for n, p in mod.named_parameters(recurse=False):
                if p.shape[0] == mod.num_experts:
                    params[f"{path}.{n}"] = ("experts",) + (None,) * (p.dim() - 1)
            inputs[parent] = outputs[parent] = _ACT
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        name = next((n for n, m in modules.items() if m is emb), None)
        if name is not None:
            params[f"{name}.weight"] = ("vocab", "embed")
            if getattr(emb, "bias", None) is not None:
                params[f"{name}.bias"] = ("vocab",)
            if emb is model.get_output_embeddings():  # the head's input: one conversion point
                inputs[name] = _ACT
    stack = layer_stack_path(model)
    if stack is not None:
        params[stack] = ("layers",)
        inputs[f"{stack}.*"] = outputs[f"{stack}.*"] = _ACT
    sl.annotate(model, params, inputs=inputs, outputs=outputs)
    return model
