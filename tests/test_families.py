"""The further model families (Gemma 1/2/3, OLMo 2, Granite, StableLM, GPT-NeoX, StarCoder2, Mixtral,
Qwen3-MoE) against Hugging Face: greedy tokens, logits through the cache, rtn_quant and ONNX export.

Each family's tiny config switches on what is particular to it (see llmc.testing._FAMILY_OVERRIDES),
and `test_family_features_are_exercised` checks that the traced step really contains it, so the
parity tests compare the feature and not a model that happens to lack it.
"""

import json
import os

import pytest
import torch

import llmc
from llmc.errors import UnsupportedArchitectureError
from llmc.generation import left_pad
from llmc.graph import module_fqn
from llmc.testing import (FAMILY_ARCHITECTURES, assert_logits_match_hf, count_ops, sqnr, tiny_model,
                          tiny_tokenizer)
from llmc.trace import DecoderStep, RoutedExperts

PROMPTS = [[5, 17, 99, 3, 42, 8, 200, 31, 77, 64, 12], [150, 9, 33]]  # lengths 11 and 3: left padding
_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield
    _CACHE.clear()


def model_and_compiled(arch):
    """The tiny seeded model of `arch` and its traced program, built once per module."""
    if arch not in _CACHE:
        model = tiny_model(arch)
        _CACHE[arch] = model, llmc.compile(model, tokenizer=tiny_tokenizer(), progress=False)
    return _CACHE[arch]


def assert_greedy_matches_hf(model, cm, new_tokens=20):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=model.generation_config.eos_token_id)
    ours = cm.generate(PROMPTS, max_new_tokens=new_tokens, return_tokens=True)
    for r, o in zip(ref[:, ids.shape[1]:].tolist(), ours):
        assert o == r[: len(o)] and all(t == 0 for t in r[len(o):])  # HF pads after EOS
    assert max(len(o) for o in ours) > 1


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_greedy_tokens_identical_to_hf_generate(arch):
    assert_greedy_matches_hf(*model_and_compiled(arch))


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_logits_match_hf_prefill_and_decode(arch):
    assert_logits_match_hf(*model_and_compiled(arch), PROMPTS)  # prefill, then two cached steps


# What each tiny model must contain for the parity tests above to cover its family.
def _features(step: DecoderStep, ops: dict) -> dict:
    rot = step.model.rotary_emb.inv_freq.numel() * 2 if hasattr(step.model.rotary_emb, "inv_freq") else None
    moe = [m for m in step.modules() if isinstance(m, RoutedExperts)]
    return {"windows": step.windows, "parallel": step.parallel, "scalars": sorted(step.scalars),
            "rotary_dim": rot, "moe_layers": len(moe), "tanh": ops.get("aten.tanh.default", 0),
            "layer_norm": ops.get("aten.layer_norm.default", 0), "rope_tables": ops.get("aten.cos.default", 0)}


EXPECTED = {
    "gemma": dict(windows=[None, None], scalars=[], tanh=0),  # GeGLU is gelu(tanh), not aten.tanh
    "gemma2": dict(windows=[6, None], scalars=["attn_softcap", "final_softcap"], tanh=3, rope_tables=1),
    "gemma3_text": dict(windows=[6, None], scalars=["final_softcap"], tanh=1, rope_tables=2),  # local + global base
    "olmo2": dict(scalars=[], layer_norm=0),
    "granite": dict(scalars=["embedding_multiplier", "logits_divisor", "residual_multiplier"]),
    "stablelm": dict(parallel=True, rotary_dim=8, layer_norm=2 * (4 + 2) + 2 + 1),  # per-head q/k norms, ln1, final
    "gpt_neox": dict(parallel=True, rotary_dim=4, layer_norm=2 * 2 + 1),
    "starcoder2": dict(windows=[6, 6], layer_norm=2 * 2 + 1),
    "mixtral": dict(moe_layers=2),
    "qwen3_moe": dict(moe_layers=1),  # layer 1 is a dense MLP (mlp_only_layers)
}


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_family_features_are_exercised(arch):
    model, cm = model_and_compiled(arch)
    got = _features(DecoderStep(model), count_ops(cm.program.gm))
    for key, want in EXPECTED[arch].items():
        assert got[key] == want, (key, got)


MIN_SQNR_4BIT = {"gemma": 12.4, "gemma2": 11.2, "gemma3_text": 8.2, "olmo2": 11.7, "granite": 18.8, "stablelm": 14.4,
                 "gpt_neox": 17.5, "starcoder2": 14.6, "mixtral": 13.2, "qwen3_moe": 11.6}


@pytest.mark.parametrize("arch", FAMILY_ARCHITECTURES)
def test_rtn_quant_and_onnx_export(arch, tmp_path):
    """rtn_quant (4 bits, every decoder linear, each expert separately) then ONNX: the export's own
    parity check (greedy tokens and logits against the torch graph), ORT generation, and a bound on
    the quantization error that fails if the weights were not quantized or were quantized wrongly."""
    from llmc.backends.onnxruntime import OrtModel, lower

    model, cm = model_and_compiled(arch)
    q = llmc.compile(cm, passes=["rtn_quant:bits=4,group=16"], progress=False)
    ops = count_ops(q.program.gm)
    dense = count_ops(cm.program.gm)["aten.linear.default"]
    assert ops["aten.linear.default"] == 1 and ops["llmc.nbits_linear.default"] == dense - 1  # only lm_head left
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref, got = cm(ids)[0], q(ids)[0]
    # measured 4-bit SQNR minus 1.5 dB; 8 bits give 34-45 dB, 3 bits 4-14 dB on these models
    assert MIN_SQNR_4BIT[arch] < sqnr(ref, got) < 30, sqnr(ref, got)
    out = lower(q.program, tmp_path / arch, fuse=False)  # one MatMulNBits per linear; fused: test_onnxruntime_fusion
    parity = json.load(open(os.path.join(out, "llmc_onnx.json")))["parity"]
    assert parity["greedy_identical"] and parity["logits_max_abs_diff"] < 1e-4
    import onnx

    graph = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == dense - 1  # each expert in its compact form
    ort = OrtModel(out)
    assert ort.generate(PROMPTS, 8, return_tokens=True) == q.generate(PROMPTS, 8, return_tokens=True)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_are_quantized_per_expert_and_routing_stays_float(arch):
    from llmc.graph import attr_tensor

    model, cm = model_and_compiled(arch)
    q = llmc.compile(cm, passes=["rtn_quant:bits=4,group=16"], progress=False)
    gm = q.program.gm
    experts = {module_fqn(n) for n in gm.graph.nodes if n.target is torch.ops.llmc.nbits_linear.default
               and ".experts." in module_fqn(n)}
    moe_layers = [i for i, layer in enumerate(DecoderStep(model).model.layers) if isinstance(layer.mlp, RoutedExperts)]
    E = model.config.num_local_experts if arch == "mixtral" else model.config.num_experts
    assert experts == {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in moe_layers for e in range(E)
                       for p in ("gate_up_proj", "down_proj")}
    # each expert has its own codes and scales
    scales = [attr_tensor(gm, f"model.layers.{moe_layers[0]}.mlp.experts.{e}.down_proj.scales") for e in range(E)]
    assert all(not torch.equal(scales[0], s) for s in scales[1:])
    # the router is a float matmul over the stored gate weight
    routers = [n for n in gm.graph.nodes
               if n.target is torch.ops.aten.matmul.default and module_fqn(n).endswith(".mlp")]
    assert len(routers) == len(moe_layers)
    assert ops_of(gm, "aten.topk.default") == len(moe_layers)


def ops_of(gm, name):
    return count_ops(gm).get(name, 0)


def test_llama3_rope_scaling_matches_hf():
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    model = tiny_model("llama", rope_parameters=rope)
    plain = tiny_model("llama")
    cm = llmc.compile(model, tokenizer=tiny_tokenizer(), progress=False)
    assert not torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)  # scaling applied
    assert_logits_match_hf(model, cm, PROMPTS)


def test_sequential_residual_variant_of_gpt_neox():
    model = tiny_model("gpt_neox", use_parallel_residual=False)
    cm = llmc.compile(model, tokenizer=tiny_tokenizer(), progress=False)
    assert not DecoderStep(model).parallel
    assert_logits_match_hf(model, cm, PROMPTS)


def test_gpt_neox_modules_appear_under_llmc_names():
    model, cm = model_and_compiled("gpt_neox")
    fqns = {module_fqn(n) for n in cm.program.gm.graph.nodes if n.target is torch.ops.aten.linear.default}
    assert "model.layers.1.self_attn.query_key_value" in fqns and "model.layers.0.mlp.dense_4h_to_h" in fqns


def test_unsupported_family_refused_from_config_alone(tmp_path):
    """A folder whose config names an untraceable family fails before any weight is read (there are none)."""
    from llmc.models import load_model

    for model_type, arch in [("olmoe", "OlmoeForCausalLM"), ("qwen2_moe", "Qwen2MoeForCausalLM")]:
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
        with pytest.raises(UnsupportedArchitectureError, match=f"'{model_type}' \\({arch}\\).*gemma2"):
            load_model(str(folder), traceable=True)


def test_missing_family_module_is_named():
    import copy

    model = copy.deepcopy(model_and_compiled("gpt_neox")[0])
    del model.gpt_neox.final_layer_norm
    with pytest.raises(UnsupportedArchitectureError, match="gpt_neox.final_layer_norm"):
        llmc.to_program(model)
    model = copy.deepcopy(model_and_compiled("olmo2")[0])
    del model.model.layers[1].post_feedforward_layernorm
    with pytest.raises(UnsupportedArchitectureError, match="model.layers.1.post_feedforward_layernorm"):
        llmc.to_program(model)
