"""Triton backend: tiny models of every representation decode like the torch runtime (kernels in
Triton's CPU interpreter); the folder, the CLI, refusals."""

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its language is built for the interpreter then

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import llmc  # noqa: E402
from llmc.backends.triton import TritonModel, lower  # noqa: E402
from llmc.errors import UnsupportedOpError  # noqa: E402
from llmc.testing import count_ops, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 17, 99, 3, 42, 8, 200, 31, 77], [150, 9, 33]]
SMALL_PV = "codebooks=2,bits=4,group=4,kmeans_iters=10,max_epochs=2,adam_steps=5,ft_epochs=1,tune_samples=0,steps=0"
# Every representation, three models: scalar codes (GPTQ 4-bit) + CQ cache codes; RTN 3-bit codes (values
# straddling bytes) with quantized embeddings + a KIVI cache; AQLM vector codes.
REPRESENTATIONS = {
    "gptq4+cq_kv": (["gptq_quant:bits=4,group=16", "cq_kv:config=4c8b,tokens=512"],
                    {"llmc::nbits_linear": 14, "llmc::cq_encode": 4, "llmc::cq_decode": 4}),
    "rtn3+emb+kivi": (["rtn_quant:bits=3,group=16,embeddings=true", "uniform_kv:mode=kivi,bits=2,group=4,"
                       "value_group=8,residual=3"],
                      {"llmc::nbits_linear": 14, "llmc::nbits_embedding": 1, "llmc::kivi_append": 4}),
    "pv_quant": ([f"pv_quant:{SMALL_PV}"], {"llmc::vq_linear": 14}),
}


def _calib(n=8, length=64):
    return [torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def rtn_folder(tiny_models, tmp_path_factory):
    cm = llmc.compile(tiny_models["llama"], passes=["rtn_quant:bits=4,group=16"], tokenizer=tiny_tokenizer(),
                      progress=False)
    return cm, lower(cm.program, tmp_path_factory.mktemp("triton") / "rtn4")


@pytest.mark.parametrize("name", list(REPRESENTATIONS))
def test_every_representation_decodes_like_torch(name, tiny_models, tmp_path):
    passes, ops = REPRESENTATIONS[name]
    cm = llmc.compile(tiny_models["llama"], passes=passes, calibration=_calib(), tokenizer=tiny_tokenizer(),
                      progress=False)
    out = lower(cm.program, tmp_path / name)
    manifest = json.load(open(os.path.join(out, "llmc_triton.json")))
    assert manifest["ops"] == ops
    model = TritonModel(out)
    assert model.device == "cpu" and not model.compiled
    triton_ops = {k: v for k, v in count_ops(model.program.gm).items() if k.startswith("llmc")}
    assert triton_ops == {f"llmc_triton.{k.split('::')[1]}.default": n for k, n in ops.items()}  # every op rewritten
    assert model.generate(PROMPTS, 8, return_tokens=True) == cm.generate(PROMPTS, 8, return_tokens=True)
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids)[0], cm(ids)[0], atol=1e-4, rtol=1e-4)


def test_folder_is_the_core_program_plus_a_kernel_manifest(rtn_folder):
    from llmc.backend import owner

    cm, out = rtn_folder
    assert sorted(os.listdir(out)) == ["checksums.json", "llmc_triton.json", "program"]
    assert {"weights.safetensors", "graph.pt2", "manifest.json", "config.json"} <= set(os.listdir(os.path.join(out, "program")))
    manifest = json.load(open(os.path.join(out, "llmc_triton.json")))
    assert manifest["format"] == "llmc-triton" and manifest["kernels"] == {
        "llmc::nbits_linear": ["nbits_gemv_packed", "nbits_gemv", "nbits_gemm"]}
    assert owner(str(out)).name == "triton"  # not the torch backend, whose manifest is in program/
    from safetensors import safe_open

    with safe_open(os.path.join(out, "program", "weights.safetensors"), "pt") as f:  # codes stay packed uint8
        codes = [k for k in f.keys() if k.endswith("codes")]
        assert len(codes) == 14 and all(f.get_slice(k).get_dtype() == "U8" for k in codes)
    model = llmc.load(str(out))
    assert isinstance(model, TritonModel)
    rep = model.report()
    assert rep["backend"] == "triton" and rep["ops"]["llmc_triton.nbits_linear.default"] == 14
    assert rep["size"]["decoder_linear_bits_per_param"] == pytest.approx(4 + 32 / 16 + 4 / 16)  # codes, fp32 scales, zeros


def test_a_corrupt_folder_is_refused(rtn_folder, tmp_path):
    import shutil

    from llmc.errors import ArtifactError

    _, out = rtn_folder
    bad = shutil.copytree(out, tmp_path / "bad")
    with open(os.path.join(bad, "program", "weights.safetensors"), "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\xff" * 16)
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        TritonModel(str(bad))


def test_cli_compile_generate_inspect(hf_folder, tmp_path, capsys):
    from llmc.cli import main

    out = str(tmp_path / "q4")
    assert main(["compile", hf_folder, "--pass", "rtn_quant:bits=4,group=16", "--backend", "triton", "-o", out]) == 0
    capsys.readouterr()
    assert main(["generate", out, "hello", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.strip() == ("hello" + llmc.load(out).generate("hello", 5)).strip()  # parity with torch: above
    assert main(["inspect", out]) == 0
    assert "llmc_triton.nbits_linear.default" in capsys.readouterr().out


def test_without_gpu_or_interpreter_running_fails_with_one_line(rtn_folder, monkeypatch, capsys):
    from llmc.cli import main

    _, out = rtn_folder
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", str(out), "hi", "--max-new-tokens", "2"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmc: error:") and "TRITON_INTERPRET=1" in err[0] \
        and "CUDA GPU" in err[0]
    assert main(["inspect", str(out)]) == 0  # opening and inspecting need no GPU


def test_an_op_without_a_kernel_is_refused_before_writing(rtn_folder, monkeypatch, tmp_path):
    from llmc.backends.triton import ops as triton_ops

    cm, _ = rtn_folder
    monkeypatch.setattr(triton_ops, "LOWERING", {k: v for k, v in triton_ops.LOWERING.items() if k != "nbits_linear"})
    with pytest.raises(UnsupportedOpError, match="llmc::nbits_linear"):
        lower(cm.program, tmp_path / "no")
    assert not os.path.exists(tmp_path / "no")


def test_half_precision_placement(rtn_folder):
    """What runs on a GPU: weights and activations cast (here float16 on CPU), RoPE kept in float32, the
    attention bias's float32 extremes made finite in the new dtype."""
    cm, out = rtn_folder
    model = TritonModel(str(out), dtype="float16")
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    logits, present = model(ids)
    assert logits.dtype == torch.float32 and all(p.dtype == torch.float16 for p in present)
    ref = cm(ids)[0]
    assert float((logits - ref).abs().max()) < 0.02 * float(ref.abs().max())
    assert bool((logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9)


def test_torch_compile_traces_the_triton_ops(rtn_folder):
    """What runs on a GPU: decode steps through torch.compile (dynamo and AOT autograd here, the Triton ops
    opaque to them), prompts eagerly."""
    cm, out = rtn_folder
    model = TritonModel(str(out), compile="aot_eager")
    assert model.compiled == "aot_eager"
    assert model.generate(PROMPTS[:1], 4, return_tokens=True) == cm.generate(PROMPTS[:1], 4, return_tokens=True)


@pytest.mark.slow
def test_binary_bases_decode_like_torch(tiny_models, tmp_path):  # slow: the qbb_quant pass itself takes ~20 s
    cm = llmc.compile(tiny_models["llama"], ["qbb_quant:bases=2,stages=1"], tokenizer=tiny_tokenizer(),
                      progress=False)
    model = TritonModel(lower(cm.program, tmp_path / "qbb"))
    assert model.op_counts == {"binary_bases_linear": 14}
    assert model.generate(PROMPTS, 8, return_tokens=True) == cm.generate(PROMPTS, 8, return_tokens=True)


@pytest.mark.slow
def test_smollm2_4bit_greedy_tokens_match_torch(tmp_path):
    cm = llmc.compile("smollm2-135m", passes=["rtn_quant:bits=4,group=64"], progress=False)
    out = lower(cm.program, tmp_path / "smol")
    prompt = "The capital of France is"
    assert TritonModel(out).generate(prompt, 3, return_tokens=True) == cm.generate(prompt, 3, return_tokens=True)
