"""export_hf: pv_quant programs written as Hugging Face AQLM checkpoints, loaded back by transformers."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import llmc
from llmc.cli import main
from llmc.errors import ExportError, UnsupportedOpError
from llmc.export_hf import save_aqlm
from llmc.testing import random_batches, tiny_model, tiny_tokenizer

# 2 codebooks of 256 codewords over groups of 8 (the AQLM 2x8 layout aqlm has CPU kernels for), with
# as little calibration as runs: the codes' quality does not matter here, only that they round-trip.
PVQ = "pv_quant:codebooks=2,bits=8,group=8,kmeans_iters=5,max_epochs=1,adam_steps=2,ft_epochs=0,steps=0"


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(n=3, seq=48, seed=0):
    return random_batches(n, seq, seed)


def _compile(model, passes, tokenizer=None):
    return llmc.compile(model, passes, calibration=_calibration(), tokenizer=tokenizer or tiny_tokenizer(),
                        progress=False)


@pytest.fixture(scope="module")
def pvq(hf_folder, tmp_path_factory):
    """The tiny llama from a Hugging Face folder, with its (byte-level BPE) Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    ck = tmp_path_factory.mktemp("pvq-ck")
    return _compile(hf_folder, [f"{PVQ},checkpoint_dir={ck}"], AutoTokenizer.from_pretrained(hf_folder))


@pytest.fixture(scope="module")
def pvq_tied(tmp_path_factory):
    """Tied embeddings (as SmolLM2), after fold_norm_scales (the layer norms' gains live in the linears),
    with only the MLPs quantized (the attention linears stay dense)."""
    ck = tmp_path_factory.mktemp("pvq-tied-ck")
    return _compile(tiny_model("llama", seed=1, tie_word_embeddings=True),
                    ["fold_norm_scales", rf"{PVQ},targets=layers\.\d+\.mlp\.,checkpoint_dir={ck}"])


def _hf_logits(hf, ids):
    """hf's logits, computed with one numba thread.

    aqlm's CPU kernel (numba, 8-bit codebooks) accumulates each output over a parallel loop on input
    groups: with more than one numba thread, threads race on the same outputs and the logits vary
    from run to run (measured: errors up to ~1.7 on logits of magnitude 2.5). One thread is exact.
    Under numba's OpenMP layer its thread count is also torch's, so both are restored after.
    """
    numba = pytest.importorskip("numba")
    threads, torch_threads = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(1)
    try:
        with torch.no_grad():
            return hf(input_ids=ids).logits
    finally:
        numba.set_num_threads(threads)
        torch.set_num_threads(torch_threads)


def _load_hf(folder):
    pytest.importorskip("aqlm", reason="the aqlm package (pip install 'aqlm[cpu]') is needed to load AQLM checkpoints")
    pytest.importorskip("scipy", reason="aqlm's CPU kernel needs scipy (pip install 'aqlm[cpu]')")
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _check_logits(cm, hf):
    """Logits of a batch of two 20-token sequences (aqlm's gemm path) and of 4 tokens (its gemv path)."""
    gen = torch.Generator().manual_seed(5)
    for ids in (torch.randint(3, 256, (2, 20), generator=gen), torch.randint(3, 256, (1, 4), generator=gen)):
        B, T = ids.shape
        with torch.no_grad():
            ref = cm.step(ids, torch.ones_like(ids), torch.arange(T).expand(B, T), cm.empty_cache(B))[0]
        got = _hf_logits(hf, ids)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_aqlm_folder_layout(pvq, tmp_path):
    folder = save_aqlm(pvq, str(tmp_path / "hf"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).encode("hello world") == pvq.tokenizer.encode("hello world")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["quantization_config"] == {
        "quant_method": "aqlm", "nbits_per_codebook": 8, "num_codebooks": 2, "in_group_size": 8, "out_group_size": 1,
        "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight", "lm_head"]}
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    assert json.load(open(os.path.join(folder, "generation_config.json")))["eos_token_id"] == 2
    state = pvq.program.state_tensors()
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        P = "model.layers.1.mlp.down_proj"
        codes = f.get_tensor(f"{P}.codes")
        assert codes.dtype == torch.int8 and codes.shape == (64, 16, 2)
        # the same bytes as llmc's uint8 codes: codes >= 128 are stored negative (two's complement)
        assert torch.equal(codes.view(torch.uint8), state[f"{P}.codes"])
        books = f.get_tensor(f"{P}.codebooks")
        assert books.dtype == torch.float32 and books.shape == (2, 256, 1, 8)
        assert f.get_tensor(f"{P}.scales").shape == (64, 1, 1, 1)
        assert torch.equal(f.get_tensor("lm_head.weight"), state["lm_head.weight"])
    assert not any(k.endswith("proj.weight") or "rotary" in k for k in keys)
    assert len(keys) == 2 * 7 * 3 + 2 * 2 + 3  # 14 quantized linears, 4 layer norms, embeddings, norm, head


def test_transformers_loads_it_with_the_same_logits(pvq, tmp_path):
    folder = save_aqlm(pvq, str(tmp_path / "hf"))
    hf = _load_hf(folder)
    from aqlm import QuantizedLinear

    assert isinstance(hf.model.layers[0].self_attn.q_proj, QuantizedLinear)
    assert type(hf.lm_head) is torch.nn.Linear
    _check_logits(pvq, hf)


def test_tied_embeddings_folded_norms_and_dense_attention(pvq_tied, tmp_path):
    folder = save_aqlm(pvq_tied, str(tmp_path / "hf"))
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["tie_word_embeddings"] is True
    dense = config["quantization_config"]["linear_weights_not_to_quantize"]
    assert "model.layers.1.self_attn.o_proj.weight" in dense and "model.layers.1.self_attn.o_proj" in dense
    assert not any("mlp" in name for name in dense)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
        assert torch.equal(f.get_tensor("model.layers.0.input_layernorm.weight"), torch.ones(64))  # folded
    hf = _load_hf(folder)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    from aqlm import QuantizedLinear

    assert isinstance(hf.model.layers[1].mlp.down_proj, QuantizedLinear)
    assert type(hf.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    _check_logits(pvq_tied, hf)


def test_biases_stay_beside_the_codes(tmp_path):
    # qwen2 has q/k/v biases: pv_quant keeps them as an aten.add after vq_linear, aqlm adds them itself
    cm = _compile(tiny_model("qwen2"), [f"{PVQ},checkpoint_dir={tmp_path / 'ck'}"])
    folder = save_aqlm(cm, str(tmp_path / "hf"))
    assert not any(f.startswith("tokenizer") for f in os.listdir(folder))  # llmc's byte tokenizer has no HF form
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.codes"} <= set(f.keys())
    hf = _load_hf(folder)
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    _check_logits(cm, hf)


def test_refuses_what_transformers_cannot_represent(tiny_compiled, tmp_path):
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match="no vector-quantized linear"):
        save_aqlm(tiny_compiled, str(out))
    rtn = llmc.compile(tiny_model("llama"), ["rtn_quant:bits=4,group=16"], tokenizer=tiny_tokenizer(), progress=False)
    with pytest.raises(UnsupportedOpError, match=r"llmc\.nbits_linear\.default \(14x\).*rtn_quant"):
        save_aqlm(rtn, str(out))
    cq = llmc.compile(tiny_model("llama"), ["cq_kv:config=2c8b,tokens=512,iters=2,calib_sequences=6"],
                      calibration=_calibration(6), tokenizer=tiny_tokenizer(), progress=False)
    with pytest.raises(UnsupportedOpError, match=r"llmc\.cq_decode.*llmc\.cq_encode"):
        save_aqlm(cq, str(out))
    kv = llmc.compile(tiny_model("llama"), ["uniform_kv:bits=4,tokens=256,calib_sequences=2"],
                      calibration=_calibration(2), tokenizer=tiny_tokenizer(), progress=False)
    with pytest.raises(UnsupportedOpError, match="uniform_kv"):  # aten ops only, but not an HF architecture
        save_aqlm(kv, str(out))
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing written, not even a temporary folder


def test_existing_folder_is_kept(pvq, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists"):
        save_aqlm(pvq, str(out))
    assert os.listdir(out) == ["keep.txt"]
    save_aqlm(pvq, str(out), overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)


def test_cli_export_hf(pvq, tiny_compiled, tmp_path, capsys):
    saved = str(tmp_path / "compiled")
    pvq.save(saved)
    out = str(tmp_path / "hf")
    assert main(["export-hf", saved, "-o", out]) == 0
    assert "2x8 bits per group of 8" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["quant_method"] == "aqlm"
    assert main(["export-hf", saved, "-o", out]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 2
    assert "not a compiled llmc folder" in capsys.readouterr().err
    dense = str(tmp_path / "dense")
    tiny_compiled.save(dense)
    assert main(["export-hf", dense, "-o", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llmc: error:") and "pv_quant" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "y")
