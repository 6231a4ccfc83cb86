"""`lower(program, out_dir)`: a Program exported as an ONNX folder that ONNX Runtime (and onnxruntime-genai) run.

The folder holds `model.onnx` + `model.onnx.data` (external weights), Optimum-named I/O
(`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key/value` -> `logits`,
`present.{i}.key/value`), the tokenizer and config, `genai_config.json`, and `llmc_onnx.json`
(cache layout, pass history, versions, parity report); the pass history is also in the ONNX
metadata. A program with `llmc::vq_linear` layers lowered to llmc's custom op also carries the
custom-op library (`libllmc_ort_ops.so`, named in the manifest). It is written to a temporary
sibling folder, checked against the torch program (logits on a padded batch and a greedy
decode), and renamed into place only if it agrees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings

import torch

from llmc.backends.onnxruntime import custom_ops
from llmc.backends.onnxruntime.bases_outliers import fuse_bases_outliers
from llmc.backends.onnxruntime.cq_attention import fuse_cq_attention
from llmc.backends.onnxruntime.gqa import fuse_group_query_attention, past_length_from_mask
from llmc.backends.onnxruntime.runtime import ONNX_MANIFEST, OrtModel
from llmc.backends.onnxruntime.translations import TRANSLATIONS, VQ_LOWERINGS, translations
from llmc.errors import ExportError, ParityError, UnsupportedOpError
from llmc.fsutil import atomic_folder
from llmc.graph import op_name
from llmc.progress import log
from llmc.trace import INPUT_NAMES

MODEL_FILE = "model.onnx"
PREFILL_FILE = "model_prefill.onnx"
DATA_FILE = "model.onnx.data"
FORMAT = "llmc-onnx"
FORMAT_VERSION = 1


def unsupported_ops(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the llmc custom ops in `gm` that have no ONNX translation."""
    missing = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace == "llmc" and node.target not in TRANSLATIONS:
                missing.add(op_name(node.target))
    return sorted(missing)


def _rename_dims(model_path: str, program) -> None:
    """Give the exporter's symbolic dims (s10, s70, ...) the names Optimum and genai use."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    graph = model.graph
    inputs = {v.name: v for v in graph.input}
    names = {}

    def dim(value, i):
        return inputs[value].type.tensor_type.shape.dim[i].dim_param

    names[dim("input_ids", 0)] = "batch_size"
    names[dim("input_ids", 1)] = "sequence_length"
    names[dim("attention_mask", 1)] = "total_sequence_length"
    names[dim(program.cache_layout[0].input_name, 2)] = "past_sequence_length"
    names.pop("", None)
    token = re.compile(r"\bs\d+\b")
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                renamed = token.sub(lambda m: names.get(m.group(0), m.group(0)), d.dim_param)
                if value.name.startswith("present.") and "+" in renamed:
                    renamed = "total_sequence_length"
                d.dim_param = renamed
    onnx.save(model, model_path)


def _write_prefill_graph(folder: str) -> bool:
    """Write model_prefill.onnx: the same graph with logits for the last position only.

    Generation only needs the last position's logits after the prompt; the full graph computes
    lm_head for every prompt token. The variant slices lm_head's input to the last position and
    shares `model.onnx.data` with the main graph (no second copy of the weights on disk).
    """
    import onnx
    from onnx import helper

    model = onnx.load(os.path.join(folder, MODEL_FILE), load_external_data=False)
    graph = model.graph
    head = next((n for n in graph.node if "logits" in n.output), None)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return False
    hidden = head.input[0]
    consts = [helper.make_tensor(f"llmc_prefill_{k}", onnx.TensorProto.INT64, [1], [v])
              for k, v in (("start", -1), ("end", 2**63 - 1), ("axis", 1))]
    graph.initializer.extend(consts)
    sliced = hidden + "_last_position"
    index = list(graph.node).index(head)
    graph.node.insert(index, helper.make_node("Slice", [hidden] + [c.name for c in consts], [sliced],
                                              name="llmc_prefill_slice"))
    head.input[0] = sliced
    for out in graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, os.path.join(folder, PREFILL_FILE))
    return True


def _genai_config(program, library: str | None = None, shared: bool = False) -> dict:
    """onnxruntime-genai's config for the folder; `library` (a file name in the folder) is llmc's custom-op
    library, which genai registers from `custom_ops_library` (it must be a real file inside the folder).
    `shared`: the graph takes the past's length from the mask, so genai may bind one buffer per cache tensor
    as past and present (its past_present_share_buffer; SmolLM2 4-bit at 8x128: 381 against 275 tok/s in
    genai, the same tokens)."""
    cfg = program.config
    layout = program.cache_layout
    eos = list(program.eos_ids) or [getattr(cfg, "eos_token_id", 0)]
    pad = getattr(program.tokenizer, "pad_token_id", None)
    return {
        "model": {
            "bos_token_id": getattr(cfg, "bos_token_id", None) if getattr(cfg, "bos_token_id", None) is not None else 0,
            "context_length": getattr(cfg, "max_position_embeddings", 2048),
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad if pad is not None else eos[0],
            "type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    **({"custom_ops_library": library} if library else {})},
                "filename": MODEL_FILE,
                "head_size": layout[0].shape[3],
                "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": program.num_layers,
                "num_key_value_heads": layout[0].shape[1],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": min(getattr(cfg, "max_position_embeddings", 2048), 4096),
                   "min_length": 0, "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": shared,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def _export(program, folder: str, lowering: str | None, fuse: bool = False) -> tuple[float, dict, bool]:
    """torch.onnx.export of the re-exported program into `folder` with the translations of `lowering`
    (with "kernel", a CQ cache's attention reads the codes, llmc.backends.onnxruntime.cq_attention, and
    binary-bases layers take their outliers in the same op, llmc.backends.onnxruntime.bases_outliers),
    then (if `fuse`) the fused lowering (llmc.backends.onnxruntime.fusion, with attention over a float cache
    as GroupQueryAttention, llmc.backends.onnxruntime.gqa); returns seconds, the rewrite counts and whether
    the cache inputs may share their buffers with the outputs."""
    t0 = time.perf_counter()
    gm, counts = program.gm, {}
    shared = False
    if lowering == "kernel":
        gm, counts["CQAttention"], counts["CQCachedAttention"] = fuse_cq_attention(gm)
        if counts["CQCachedAttention"]:  # a copy: its caches may become buffers shared with the outputs
            shared = past_length_from_mask(gm)
        gm, counts["BinaryBasesLinear.outliers"] = fuse_bases_outliers(gm)
    if fuse:
        gm, counts["GroupQueryAttention"], float_shared = fuse_group_query_attention(gm)
        shared = shared or float_shared
    table = translations(lowering or "dequantize")
    ep = program.exported(gm)
    input_names = list(INPUT_NAMES) + [c.input_name for c in program.cache_layout]
    output_names = ["logits"] + [c.output_name for c in program.cache_layout]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(
            ep, args=program.example_inputs(), dynamo=True, input_names=input_names, output_names=output_names,
            custom_translation_table=table, external_data=True, optimize=True, verbose=False)
    history = json.dumps([h.to_json() for h in program.history])
    onnx_program.model.metadata_props.update({"llmc.history": history, "llmc.source": program.source or program.name})
    path = os.path.join(folder, MODEL_FILE)
    onnx_program.save(path, external_data=True)
    written = {f for f in os.listdir(folder) if f != MODEL_FILE}
    if written != {DATA_FILE}:  # the exporter names the data file after the model file
        raise ExportError(f"unexpected files beside {MODEL_FILE}: {sorted(written)}")
    _rename_dims(path, program)
    fusions = {k: v for k, v in counts.items() if v}
    if fuse:
        from llmc.backends.onnxruntime.fusion import fuse as fuse_graph

        fusions.update(fuse_graph(path, max_positions=getattr(program.config, "max_position_embeddings", None) or 2048))
    _write_prefill_graph(folder)
    return time.perf_counter() - t0, fusions, shared


def has_int8_activations(gm: torch.fx.GraphModule) -> bool:
    """Whether some `llmc::nbits_linear` rounds its input to int8 (set by the int8_activations pass)."""
    return any(n.op == "call_function" and n.target is torch.ops.llmc.nbits_linear.default
               and (n.args[8] if len(n.args) > 8 else n.kwargs.get("int8_act", False)) for n in gm.graph.nodes)


# Statistical parity for programs with int8 activations (see check_parity): bounds measured on
# SmolLM2-135M RTN 4-bit, where ORT against torch gives mean KL 0.006-0.008 and 93-96% argmax
# agreement, the same distance as between float and int8 activations in torch itself.
STATISTICAL_MAX_MEAN_KL = 0.05
STATISTICAL_MIN_ARGMAX_AGREEMENT = 0.8


def check_parity(program, folder: str, decode_tokens: int = 16, atol: float = 1e-3) -> dict:
    """Compare the ONNX folder with the torch program: logits on a padded batch, then a greedy decode.

    Raises ParityError with the max difference (or the first diverging step) on a mismatch.

    A program with int8 activations is a discontinuous function of its input: torch and ORT round
    each activation block identically (llmc.ops.nbits_linear is bit-exact with MatMulNBits'
    accuracy_level=4), but their float sums differ in the last bits, and wherever a value lies on a
    rounding tie that flips one int8 level, which a deep model amplifies (SmolLM2: logits differ by
    up to ~1.4 at batch 2). For such programs the check is statistical: mean KL(torch || ORT) over
    the batch <= STATISTICAL_MAX_MEAN_KL and argmax agreement >= STATISTICAL_MIN_ARGMAX_AGREEMENT;
    the greedy decodes are compared and reported, not required to be identical.
    """
    from llmc.generation import SamplingConfig, generate_tokens, left_pad, position_ids_from_mask
    from llmc.runner import TorchRunner

    ort_model = OrtModel(folder)
    runner = TorchRunner(program)
    vocab = program.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (11, 6)]
    ids, mask = left_pad(prompts, pad_id=0)
    pos = position_ids_from_mask(mask)
    t_logits, _ = runner.step(ids, mask, pos, program.empty_cache(2, 0))
    o_logits, _ = ort_model.step(ids, mask, pos, ort_model.empty_cache(2))
    real = mask.bool()
    diff = float((t_logits[real] - o_logits[real]).abs().max())
    o_last, _ = ort_model.prefill_step(ids, mask, pos, ort_model.empty_cache(2))  # the last-position graph
    diff = max(diff, float((t_logits[:, -1:] - o_last).abs().max()))
    report = {"logits_max_abs_diff": diff, "greedy_tokens": decode_tokens, "batch": 2,
              "prompt_lengths": [len(p) for p in prompts]}
    statistical = has_int8_activations(program.gm)
    if statistical:
        t_log, o_log = t_logits[real].log_softmax(-1), o_logits[real].log_softmax(-1)
        kl = float((t_log.exp() * (t_log - o_log)).sum(-1).mean())
        agree = float((t_log.argmax(-1) == o_log.argmax(-1)).float().mean())
        report.update(mode="statistical (int8 activations)", mean_kl=kl, argmax_agreement=agree,
                      max_mean_kl=STATISTICAL_MAX_MEAN_KL, min_argmax_agreement=STATISTICAL_MIN_ARGMAX_AGREEMENT)
        if not (kl <= STATISTICAL_MAX_MEAN_KL and agree >= STATISTICAL_MIN_ARGMAX_AGREEMENT):
            raise ParityError(f"ONNX logits disagree with torch beyond int8-rounding noise (mean KL {kl:.3g}, bound "
                              f"{STATISTICAL_MAX_MEAN_KL}; argmax agreement {agree:.2f}, bound "
                              f"{STATISTICAL_MIN_ARGMAX_AGREEMENT}); the export is not written")
    elif not diff <= atol:
        raise ParityError(f"ONNX logits differ from torch by {diff:.3g} (max |diff| on a padded batch of 2, "
                          f"tolerance {atol}); the export is not written")
    else:
        report.update(mode="exact", atol=atol)
    cfg = SamplingConfig(max_new_tokens=decode_tokens)
    t_tokens = generate_tokens(runner.step, program.empty_cache, prompts, cfg, pad_id=0)
    o_tokens = generate_tokens(ort_model.step, ort_model.empty_cache, prompts, cfg, pad_id=0,
                               prefill_step=ort_model.prefill_step)
    same = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            for a, b in zip(t_tokens, o_tokens)]
    report.update(greedy_identical=t_tokens == o_tokens, greedy_identical_prefix=same)
    if not statistical:
        for row, (a, b) in enumerate(zip(t_tokens, o_tokens)):
            if a != b:
                k = same[row]
                raise ParityError(f"ONNX greedy decode diverges from torch at token {k} of row {row} "
                                  f"(torch {a[k]}, onnx {b[k]}; logits max |diff| {diff:.3g}); the export is not written")
    return report


def has_kernel_ops(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph has what llmc's custom ops run: layers of vector codes or binary bases (llmc.VQLinear),
    or attention over a CQ-coded cache (llmc.CQAttention)."""
    kernel_ops = (torch.ops.llmc.vq_linear.default, torch.ops.llmc.binary_bases_linear.default,
                  torch.ops.llmc.cq_decode.default)
    return any(n.op == "call_function" and n.target in kernel_ops for n in gm.graph.nodes)


def resolve_vq_lowering(program, vq_lowering: str) -> str | None:
    """The lowering of the program's coded tensors, `llmc::vq_linear` / `binary_bases_linear` layers and a
    CQ cache's attention (None if it has none).

    "auto" is "kernel" (the codes stay uint8 in the session, read by llmc's custom ops) where the
    custom-op library builds here, else "dequantize" (standard ONNX: a float weight in the session,
    the CQ cache gathered into float every step).
    """
    if vq_lowering not in ("auto", *VQ_LOWERINGS):
        raise ExportError(f"vq_lowering must be 'auto' or one of {', '.join(VQ_LOWERINGS)}, got {vq_lowering!r}")
    if not has_kernel_ops(program.gm):
        return None
    if vq_lowering == "auto":
        try:
            custom_ops.library_path()
        except ExportError as e:
            log(f"vq_linear is lowered by dequantization (ONNX Runtime will hold float weights): {e}")
            return "dequantize"
        return "kernel"
    if vq_lowering == "kernel":
        custom_ops.library_path()  # raises ExportError saying why it cannot be built
    return vq_lowering


def lower(program, out_dir: str, *, parity: bool = True, overwrite: bool = False, atol: float = 1e-3,
          vq_lowering: str = "auto", fuse: bool = True) -> str:
    """Write `program` as an ONNX folder at `out_dir` and return its path.

    `vq_lowering` picks how coded tensors are read (`resolve_vq_lowering`): "kernel" puts llmc's
    custom-op library in the folder (`libllmc_ort_ops.so`, named in the manifest, registered by
    OrtModel), whose ops read vector codes, binary bases and a CQ cache's codes at run time (the
    manifest's "fusions" counts the CQAttention layers and the binary-bases layers that took their
    outliers in); "dequantize" writes standard ONNX only. `fuse` rewrites norms, the
    rotary embedding and MatMulNBits siblings into ONNX Runtime's fused contrib ops
    (llmc.backends.onnxruntime.fusion); the manifest's "fusions" says which fired, how many times.

    Raises UnsupportedOpError (naming every op) before writing anything if some llmc op has no
    translation, ExportError if `out_dir` exists (unless `overwrite`), the export fails, or the
    custom ops are asked for and cannot be built, and ParityError if ONNX Runtime disagrees with
    torch (unless `parity=False`). On any failure nothing is left at `out_dir`.
    """
    from llmc.compiled import versions

    missing = unsupported_ops(program.gm)
    if missing:
        raise UnsupportedOpError(f"the onnxruntime backend cannot lower {', '.join(missing)}: no ONNX translation "
                                 "in llmc.backends.onnxruntime.TRANSLATIONS")
    lowering = resolve_vq_lowering(program, vq_lowering)
    out_dir = os.path.abspath(out_dir)
    with atomic_folder(out_dir, overwrite, error=ExportError) as tmp:
        log(f"exporting ONNX ({program.num_layers} layers)")
        try:
            seconds, fusions, shared = _export(program, tmp, lowering, fuse=fuse)
        except (ExportError, UnsupportedOpError):
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first}") from e
        fired = ", ".join(f"{k} {v}" for k, v in (fusions or {}).items() if v)
        log(f"exported in {seconds:.1f} s" + (f"; fused: {fired}" if fired else ""))
        library = None
        if lowering == "kernel":
            library = custom_ops.LIBRARY_NAME
            shutil.copyfile(custom_ops.library_path(), os.path.join(tmp, library))
        program.config.to_json_file(os.path.join(tmp, "config.json"))
        if program.tokenizer is not None:
            program.tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "genai_config.json"), "w") as f:
            json.dump(_genai_config(program, library, shared), f, indent=2)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "name": program.name, "source": program.source,
            "versions": versions(), "model_file": MODEL_FILE, "data_file": DATA_FILE,
            "prefill_file": PREFILL_FILE if os.path.exists(os.path.join(tmp, PREFILL_FILE)) else None,
            "export_seconds": round(seconds, 2), "vq_lowering": lowering, "custom_ops_library": library,
            "fuse": bool(fuse), "fusions": fusions or {}, "cache_buffers": "shared" if shared else "concatenated",
            "cache_layout": [c.to_json() for c in program.cache_layout], "eos_ids": list(program.eos_ids),
            "history": [h.to_json() for h in program.history], "parity": None,
        }
        _write_json(os.path.join(tmp, ONNX_MANIFEST), manifest)
        if parity:
            log("checking ONNX Runtime against torch")
            try:
                manifest["parity"] = check_parity(program, tmp, atol=atol)
            except ParityError as e:
                hints = ["the fused lowering (backend option fuse=false exports without it)"] * bool(fuse)
                if {"CQAttention", "BinaryBasesLinear.outliers"} & set(fusions or {}):
                    hints.append("llmc's CQ attention / binary-bases ops (vq_lowering='dequantize' exports without them)")
                if not hints:
                    raise
                raise ParityError(f"{e} (with {'; with '.join(hints)})") from e
            _write_json(os.path.join(tmp, ONNX_MANIFEST), manifest)
    return out_dir


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
