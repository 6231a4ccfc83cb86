"""The llmc command line, in-process: each command, and one clear line for each bad input."""

import json
import os

import pytest

from llmc.cli import main


@pytest.fixture(scope="module")
def compiled_dir(hf_folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("c") / "out")
    assert main(["compile", hf_folder, "--pass", "fold_norm_scales", "-o", out]) == 0
    return out


def test_compile_writes_a_loadable_folder(compiled_dir, capsys):
    manifest = json.load(open(os.path.join(compiled_dir, "manifest.json")))
    assert [h["spec"] for h in manifest["history"]] == ["fold_norm_scales"]
    assert main(["inspect", compiled_dir]) == 0
    out = capsys.readouterr().out
    assert "aten.linear.default" in out and "past_key_values.{i}.key" in out and "bits/param" in out


def test_inspect_json(compiled_dir, capsys):
    assert main(["inspect", compiled_dir, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ops"]["aten.linear.default"] == 15 and rep["layers"] == 2


def test_eval_ppl_compiled_and_source_agree(compiled_dir, hf_folder, text_file, capsys):
    assert main(["eval", "ppl", compiled_dir, "--data", text_file, "--protocol", "ppl-64x4", "--json"]) == 0
    a = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "ppl", hf_folder, "--data", text_file, "--protocol", "ppl-64x4", "--json"]) == 0
    b = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert a["windows"] == 4 and abs(a["ppl"] - b["ppl"]) < 1e-3 * b["ppl"]


def test_generate_matches_api(compiled_dir, capsys):
    import llmc

    assert main(["generate", compiled_dir, "Hello", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "Hello" + llmc.load(compiled_dir).generate("Hello", 8)


def test_backends_lists_options(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "torch: " in out and "onnxruntime: " in out and "vq_lowering (Literal" in out


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold_norm_scales" in out and "norms (str" in out


def _one_line_error(capsys, argv, code, message):
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmc: error:") and message in err[0], err


@pytest.mark.parametrize("argv,message", [
    (["compile", "./nope", "-o", "{tmp}/o"], "no such model"),
    (["compile", "{hf}", "--pass", "nonexistent_pass", "-o", "{tmp}/o"], "unknown pass 'nonexistent_pass'"),
    (["compile", "{hf}", "--pass", "fold_norm_scales:bogus=1", "-o", "{tmp}/o"], "has no option 'bogus'"),
    (["eval", "ppl", "{hf}", "--protocol", "ppl-5", ], "unknown protocol"),
    (["eval", "ppl", "{hf}", "--data", "no-such-data"], "no such data set"),
    (["generate", "{hf}", "hi", "--top-p", "2"], "top_p"),
    (["inspect", "{tmp}/missing-dir"], "no such model"),
    (["compile", "{hf}", "--backend", "onnxrt", "-o", "{tmp}/o"], "unknown backend 'onnxrt' (did you mean 'onnxruntime'?)"),
    (["compile", "{hf}", "--backend", "onnxruntime", "--backend-option", "vq_lowerin=kernel", "-o", "{tmp}/o"],
     "backend 'onnxruntime' has no option 'vq_lowerin' (did you mean 'vq_lowering'?)"),
    (["compile", "{hf}", "--backend", "onnxruntime", "--backend-option", "parity", "-o", "{tmp}/o"], "has no value"),
    (["compile", "{hf}", "--no-parity", "-o", "{tmp}/o"], "backend 'torch' has no option 'parity'"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, hf_folder, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, hf=hf_folder) for a in argv]
    _one_line_error(capsys, argv, 2, message)
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_without_overwrite(hf_folder, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    _one_line_error(capsys, ["compile", hf_folder, "-o", str(tmp_path / "o")], 2, "already exists")
    assert main(["compile", hf_folder, "-o", str(tmp_path / "o"), "--overwrite"]) == 0
    assert (tmp_path / "o" / "manifest.json").exists()


def test_corrupt_folder_is_one_line(compiled_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(compiled_dir, bad)
    (bad / "weights.safetensors").write_bytes(b"garbage")
    _one_line_error(capsys, ["generate", str(bad), "hi"], 2, "corrupt")  # a bad folder is bad input


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("llmc: error:")


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    _one_line_error(capsys, ["compile", str(tmp_path / "gpt2"), "-o", str(tmp_path / "o")], 2,
                    "cannot trace architecture 'gpt2'")
    assert not (tmp_path / "o").exists()


def test_compile_with_calibrated_kv_pass_and_eval_through_the_cache(hf_folder, text_file, tmp_path, capsys):
    out = str(tmp_path / "cq")
    spec = "cq_kv:config=4c8b,tokens=256,calib_sequences=2,iters=3"
    assert main(["compile", hf_folder, "--pass", spec, "--calib", text_file, "-o", out]) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {c["dtype"] for c in rep["cache_layout"]} == {"uint8"} and rep["ops"]["llmc.cq_decode.default"] == 4
    # 2 layers x (keys + values) x 2 KV heads x 16 channels at 8 bits per 4 channels; uint8 codes hold 4 bytes
    kv = rep["size"]["kv_cache"]
    assert kv["bits_per_channel"] == 2.0 and kv["bytes_per_token"] == 32 and kv["stored_bytes_per_token"] == 32
    assert main(["eval", "ppl", out, "--data", text_file, "--protocol", "ppl-320x2-kv", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["windows"] == 2
