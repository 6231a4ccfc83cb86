"""Export a compiled program as a Hugging Face checkpoint that `transformers` loads with a quantizer.

`save_aqlm` writes a `pv_quant` program in the AQLM layout (`quantization_config.quant_method =
"aqlm"`), which `transformers.AutoModelForCausalLM.from_pretrained` loads when the `aqlm` package is
installed. The layout, as `aqlm.QuantizedLinear` (aqlm 1.1.x) names and shapes its tensors for a
linear of weight [N, K] at module path P:

  P.codes      [N/out_group, K/g, M]    int8 for B <= 8, int16 for B <= 16: the low bits of each code
                                         in two's complement (codes >= 2^(bits-1) stored negative, i.e.
                                         the same bytes as llmc's uint8 codes; aqlm reads them back
                                         modulo 2^B or as uint8). No offset is added.
  P.codebooks  [M, 2^B, out_group, g]   float (the model dtype)
  P.scales     [N/out_group, 1, 1, 1]   float
  P.bias       [N]                      when the linear has one

which is llmc's `llmc::vq_linear` layout with out_group = 1, so the export is a rename-free copy:
only the codes' dtype changes (uint8 -> int8, a reinterpretation of the same bytes). Every other
tensor keeps its Hugging Face name. Linears left dense (the LM head, by default) are listed in
`linear_weights_not_to_quantize`, both as weight names (how AQLM checkpoints list them) and as module
names (how transformers 5 matches them when it swaps nn.Linear modules for QuantizedLinear).

What can be exported is checked against the architecture itself: a meta-device instance of the
config's model gives the names and shapes the checkpoint must have; a program whose graph calls
other llmc ops (nbits_linear, the cq_kv cache codecs) or whose tensors do not fit the architecture
is refused with the list of what is wrong.

Loading on CPU needs `aqlm[cpu]` (numba and scipy) and float32 (the config's dtype is set to the
stored float32). aqlm 1.1.7's CPU kernel for 8-bit codebooks sums each output over a numba-parallel
loop on input groups, so with more than one numba thread its results vary from run to run; it is
exact with one (`NUMBA_NUM_THREADS=1` or `numba.set_num_threads(1)`).
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import fx

from llmc.errors import ExportError, UnsupportedOpError
from llmc.fsutil import atomic_folder
from llmc.graph import get_attr_tensor

WEIGHTS_FILE = "model.safetensors"
_VQ_LEAVES = ("codes", "codebooks", "scales")
# Passes whose output a Hugging Face AQLM checkpoint describes exactly: pv_quant's codes, and
# fold_norm_scales (its folded norms are written with unit gains). Any other rewrite (a quantized
# or compressed KV cache, pruned or refactored layers, other weight formats) has no HF form.
EXPORTABLE_PASSES = ("pv_quant", "fold_norm_scales")
_ONLY = "compile it with pv_quant (optionally after fold_norm_scales) and no other pass"


def save_aqlm(model, out_dir: str, overwrite: bool = False) -> str:
    """Write `model` (a CompiledModel or Program) to `out_dir` as an AQLM Hugging Face checkpoint.

    Writes config.json (with `quantization_config`), model.safetensors, generation_config.json and
    the tokenizer when it is a Hugging Face one. Written to a temporary sibling folder and renamed
    at the end. Returns the folder's absolute path.
    """
    program = getattr(model, "program", model)
    plan = _plan(program)  # everything is checked before anything is written
    directory = os.path.abspath(out_dir)
    with atomic_folder(directory, overwrite, error=ExportError) as tmp:
        _write(program, plan, tmp)
    return directory


# -- what to write -------------------------------------------------------------------------------

def _plan(program) -> dict:
    gm = program.gm
    _refuse_other_ops(program)
    quantized, layout = _quantized_linears(gm)
    skeleton = _skeleton(program.config)
    state = dict(program.state_tensors())
    folded_norms = any(h.name == "fold_norm_scales" for h in program.history)

    expected = skeleton.state_dict(keep_vars=True)
    aliases, tie_group = _tied_names(expected)

    tensors: dict[str, torch.Tensor] = {}
    problems = [f"{m}: quantized in the program but {type(skeleton).__name__} has no linear weight {m}.weight"
                for m in quantized if f"{m}.weight" not in expected]
    used: set[str] = set()
    for name, meta in expected.items():
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            q = quantized[module]
            N, K = meta.shape
            if q["codes"].shape[0] != N or q["codes"].shape[1] * layout["in_group_size"] != K:
                problems.append(f"{module}: codes {tuple(q['codes'].shape)} do not fit a [{N}, {K}] weight")
            for leaf_name in _VQ_LEAVES:
                tensors[f"{module}.{leaf_name}"] = q[leaf_name]
                used.add(f"{module}.{leaf_name}")
            continue
        t = state.get(name)
        if t is None:  # a pass that dropped unread names keeps one name of a tied tensor
            t = next((state[n] for n in tie_group.get(name, ()) if n in state), None)
        if t is None and folded_norms and leaf == "weight" and meta.dim() == 1 and module.endswith("norm"):
            # fold_norm_scales moved this RMSNorm's gain into the next linears: a unit gain is exact
            t = torch.ones(meta.shape, dtype=torch.float32)
        if t is None:
            if name not in aliases:
                problems.append(f"{name}: missing from the program")
            continue
        if tuple(t.shape) != tuple(meta.shape):
            problems.append(f"{name}: shape {tuple(t.shape)} in the program, {tuple(meta.shape)} in "
                            f"{type(skeleton).__name__}")
            continue
        tensors[name] = t
        used.add(name)
    for name, t in state.items():
        if name in used or name.rpartition(".")[0] in quantized and name.rpartition(".")[2] in _VQ_LEAVES:
            continue
        if name not in expected and not _is_nonpersistent_buffer(skeleton, name):
            problems.append(f"{name}: the program holds it but {type(skeleton).__name__} has no such tensor")
    if problems:
        raise ExportError(f"{program.name} does not fit the {getattr(program.config, 'model_type', '?')} "
                          f"architecture of its config, so a Hugging Face checkpoint cannot describe it: "
                          + "; ".join(problems[:12])
                          + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else ""))

    tie = _tie(program, tensors, aliases, quantized)

    dense_linears = [name for name, m in skeleton.named_modules()
                     if isinstance(m, torch.nn.Linear) and name not in quantized]
    embeddings = [name for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Embedding)]
    not_quantized = [f"{n}.weight" for n in embeddings + dense_linears] + dense_linears
    return {"tensors": tensors, "layout": layout, "tie": tie, "quantized": sorted(quantized),
            "architecture": type(skeleton).__name__, "not_quantized": not_quantized}


def _tied_names(expected: dict) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(a tied name -> the name it shares its tensor with in the architecture, name -> its tie group)."""
    first_name: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in expected.items():
        if id(t) in first_name:
            aliases[name] = first_name[id(t)]
        else:
            first_name[id(t)] = name
    tie_group = {n: [n] for n in set(aliases.values())}
    for name, source in aliases.items():
        tie_group[source].append(name)
        tie_group[name] = tie_group[source]
    return aliases, tie_group


def _tie(program, tensors: dict, aliases: dict, quantized: dict) -> bool:
    """Whether tied tensors (lm_head = embed_tokens) are stored once: while they are still equal. A
    program whose tied tensors diverged (or whose head is quantized) is written untied; the aliases
    are dropped from `tensors` when tied."""
    tie = bool(getattr(program.config, "tie_word_embeddings", False))
    for name, source in aliases.items():
        a, b = tensors.get(name), tensors.get(source)
        if a is None or b is None or not (a is b or (a.shape == b.shape and torch.equal(a, b))):
            tie = False
    if tie:
        for name in aliases:
            tensors.pop(name, None)
    else:
        missing = [n for n in aliases if n not in tensors and n.rpartition(".")[0] not in quantized]
        if missing:
            raise ExportError(f"{program.name} cannot be written untied: {', '.join(missing)} missing from the program")
    return tie


def _refuse_other_ops(program) -> None:
    counts: dict[str, int] = {}
    for n in program.gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = str(n.target) if isinstance(n.target, torch._ops.OpOverload) else ""
        if name.startswith("llmc.") and n.target is not torch.ops.llmc.vq_linear.default:
            counts[name] = counts.get(name, 0) + 1
    passes = ", ".join(h.spec or h.name for h in program.history) or "none"
    if counts:
        ops = ", ".join(f"{k} ({v}x)" for k, v in sorted(counts.items()))
        raise UnsupportedOpError(f"{program.name} cannot be exported as a Hugging Face AQLM checkpoint: its graph "
                                 f"calls llmc ops that transformers cannot represent: {ops} (passes run: {passes}); "
                                 + _ONLY)
    others = [h.spec or h.name for h in program.history if h.name not in EXPORTABLE_PASSES]
    if others:
        raise UnsupportedOpError(f"{program.name} cannot be exported as a Hugging Face AQLM checkpoint: the "
                                 f"rewrites of {', '.join(others)} have no Hugging Face form (passes run: {passes}); "
                                 + _ONLY)


def _quantized_linears(gm: fx.GraphModule) -> tuple[dict, dict]:
    """{module path: {codes (AQLM dtype), codebooks, scales}} and the layout they all share."""
    out, layouts = {}, {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not torch.ops.llmc.vq_linear.default:
            continue
        attrs = n.args[1:4]
        if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in attrs):
            raise ExportError(f"{n.name}: a vq_linear whose codes, codebooks or scales are not stored tensors")
        module = attrs[0].target.rpartition(".")[0]
        if [a.target for a in attrs] != [f"{module}.{leaf}" for leaf in _VQ_LEAVES]:
            raise ExportError(f"{n.name}: vq_linear reads {[a.target for a in attrs]}, not {module}.codes/"
                              "codebooks/scales; the checkpoint could not name them")
        codes, books, scales = (get_attr_tensor(gm, a) for a in attrs)
        M, size, out_group, g = books.shape
        bits = size.bit_length() - 1
        if (size != 1 << bits or codes.dim() != 3 or codes.shape[2] != M
                or tuple(scales.shape) != (codes.shape[0], 1, 1, 1)):
            raise ExportError(f"{module}: codes {tuple(codes.shape)}, codebooks {tuple(books.shape)} and scales "
                              f"{tuple(scales.shape)} are not an AQLM layout")
        if codes.dtype == torch.uint8 and bits <= 8:
            codes = codes.view(torch.int8)  # aqlm: int8, two's complement of the low 8 bits (same bytes)
        elif codes.dtype == torch.int16 and 8 < bits <= 16:
            pass  # llmc already stores >8-bit codes as aqlm does
        else:
            raise ExportError(f"{module}: {codes.dtype} codes for {bits}-bit codebooks; aqlm expects "
                              f"{'int8' if bits <= 8 else 'int16'}")
        layouts.setdefault((M, bits, out_group, g), []).append(module)
        out[module] = {"codes": codes, "codebooks": books, "scales": scales}
    if not out:
        raise ExportError("the program has no vector-quantized linear layers (llmc::vq_linear) to write in the AQLM "
                          "layout; compile it with --pass pv_quant first")
    if len(layouts) > 1:
        desc = "; ".join(f"{M}x{b} bits, group {g}: {len(mods)} layers (e.g. {mods[0]})"
                         for (M, b, _, g), mods in layouts.items())
        raise ExportError(f"an AQLM checkpoint has one codebook layout for all layers, this program has several: "
                          f"{desc}")
    (M, bits, out_group, g), = layouts
    return out, {"quant_method": "aqlm", "nbits_per_codebook": bits, "num_codebooks": M, "in_group_size": g,
                 "out_group_size": out_group}


def _skeleton(config):
    """The config's causal LM on the meta device: the names and shapes a checkpoint of it has."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any failure means transformers cannot build this architecture
        raise ExportError(f"transformers cannot build a {getattr(config, 'model_type', '?')} model from the "
                          f"program's config: {type(e).__name__}: {e}") from e


def _is_nonpersistent_buffer(skeleton, name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    try:
        owner = skeleton.get_submodule(module) if module else skeleton
    except AttributeError:
        return False
    return leaf in getattr(owner, "_non_persistent_buffers_set", ())


# -- writing -------------------------------------------------------------------------------------

def _write(program, plan: dict, folder: str) -> None:
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in plan["tensors"].items():
        t = t.detach().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(key)
        tensors[name] = t
    save_file(tensors, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})

    config = copy.deepcopy(program.config)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        config.dtype = float_dtypes.pop()  # the model's dtype is what was stored (aqlm's CPU kernel needs fp32)
    config.tie_word_embeddings = plan["tie"]
    if not getattr(config, "architectures", None):
        config.architectures = [plan["architecture"]]
    config.quantization_config = dict(plan["layout"], linear_weights_not_to_quantize=plan["not_quantized"])
    config.save_pretrained(folder)
    _write_generation_config(program, config, folder)
    _write_tokenizer(program.tokenizer, folder)
    with open(os.path.join(folder, "config.json")) as f:
        if json.load(f).get("quantization_config", {}).get("quant_method") != "aqlm":
            raise ExportError("transformers did not write the quantization config into config.json")


def _write_generation_config(program, config, folder: str) -> None:
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_model_config(config)
    except Exception:  # noqa: BLE001 - a generation config is optional
        return
    if program.eos_ids:
        gen.eos_token_id = program.eos_ids[0] if len(program.eos_ids) == 1 else list(program.eos_ids)
    gen.save_pretrained(folder)


def _write_tokenizer(tokenizer, folder: str) -> None:
    """A Hugging Face tokenizer is saved; llmc's byte tokenizer (tiny test models) has no HF form."""
    if tokenizer is None:
        return
    from transformers import PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        tokenizer.save_pretrained(folder)
