"""The triton backend on one GPU: per-kernel time and bandwidth, and SmolLM2 end-to-end decode speed.

    python -m benchmarks.triton_gpu                  # on a CUDA GPU, from the repo root (< 8 minutes)
    TRITON_INTERPRET=1 python -m benchmarks.triton_gpu --smoke   # CPU: tiny shapes, every code path

Kernels (batch 1, float16 activations, random weights; Llama-2-7B layer shapes 4096x4096,
11008x4096 and 4096x11008 as N x K): the float16 cuBLAS linear, the nbits GEMV at 4 and 2 bits
(group 64, float16 scales) and the vector-code GEMV at AQLM 2x8 g8 and 1x16 g8. Each is checked
against its reference op first, then timed with triton.testing.do_bench (L2 flushed between runs);
bandwidth is the bytes a kernel must move (codes, scales, codebooks, x, y) over its time, against the
device's peak (memory clock x bus width) and against a measured device-to-device copy. Prompt-size
rows (128 tokens) time the dequantize-GEMM kernels against the float16 matmul, and the CQ decode
attention (uint8 codes, per-query score tables) is timed against float16 SDPA over a float cache at
long contexts, for SmolLM2's and Llama-2-7B's attention shapes.

End to end (SmolLM2-135M-Instruct, batch 1, greedy, EOS ignored): decode tokens/s = (N - 1) / (t(N) -
t(1)), t(n) the time of a generate() of n new tokens after a warm-up, so prompt processing and
compilation are not counted. Engines: HF float16 eager (dynamic cache), HF float16 torch.compile
(static cache, CUDA graphs: transformers' generate auto-compile), and llmc's triton backend
(bfloat16, torch.compile of the graph with the Triton ops opaque) with rtn_quant 4-bit g64, 2-bit
vector codes (2x8 g8; random codes and codebooks: speed only, the text is meaningless), and at a
long context with a float cache and with a CQ 4c8b cache (codebooks from a short k-means on random
tokens: speed only). Rows run in priority order under --budget-s; a row that fails or does not fit
records why, and the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import traceback

import torch

from benchmarks import common

# Spec memory bandwidth (bytes/s) by device name, where the memory clock is not reported.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
                  "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12, "L4": 0.3e12, "A10G": 0.6e12}


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        if self.device == "cpu":
            from llmc.backends.triton.kernels import interpreter_enabled

            if not interpreter_enabled():
                raise SystemExit("no CUDA GPU: run with TRITON_INTERPRET=1 and --smoke to check the script on CPU")
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.info: dict = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, row: dict) -> None:
        row.setdefault("device", self.info.get("device_name", self.device))
        self.rows.append(row)
        self.write()
        print(f"[{self.elapsed():6.1f}s] {row.get('row')}: " + ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("row", "device", "error_trace", *common.PROVENANCE)),
            flush=True)

    def write(self) -> None:
        from llmc.models import find_builtin_gguf, sha256_file

        if self.smoke:
            common.RESULTS = self.args.smoke_dir
            common.TRACES = os.path.join(self.args.smoke_dir, "traces")
        sha = getattr(self, "_model_sha", None)
        if sha is None:
            try:
                sha = self._model_sha = sha256_file(find_builtin_gguf("smollm2-135m"))
            except Exception as e:  # the built-in model is not installed (kernel rows still count)
                sha = self._model_sha = f"unavailable: {e}"
        common.write_result(self.args.name, self.rows, model="tiny-llama (random)" if self.smoke else "smollm2-135m",
                            model_sha256=sha, data_sha256="none: random token ids",
                            extra={"device_info": self.info, "elapsed_s": round(self.elapsed(), 1),
                                   "smoke": self.smoke})

    def guarded(self, name: str, fn, estimate_s: float = 0.0) -> None:
        """Run one row under the time budget; a failure is recorded, not raised."""
        left = self.args.budget_s - self.elapsed()
        if left < estimate_s:
            self.add({"row": name, "skipped": f"time budget: {left:.0f} s left, the row needs ~{estimate_s:.0f} s"})
            return
        try:
            for row in fn():
                self.add(row)
        except Exception as e:  # record and go on: one broken engine must not cost the others
            self.add({"row": name, "error": f"{type(e).__name__}: {e}"[:500],
                      "error_trace": traceback.format_exc()[-2000:]})
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()

    # -- timing --------------------------------------------------------------------------------
    def time_ms(self, fn) -> float:
        """Median milliseconds of fn(): do_bench on CUDA (L2 flushed), a few calls on CPU."""
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        times = []
        for _ in range(2):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    # -- device --------------------------------------------------------------------------------
    def device_info(self) -> None:
        info = {"device": self.device}
        if self.device == "cuda":
            p = torch.cuda.get_device_properties(0)
            info["device_name"] = p.name
            clock, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
            peak = 2 * clock * 1e3 * bus / 8 if clock and bus else None
            table = next((v for k, v in PEAK_BANDWIDTH.items() if k in p.name), None)
            info.update(memory_clock_khz=clock, memory_bus_bits=bus, peak_from_clock_Bps=peak, peak_spec_Bps=table)
            info["peak_Bps"] = peak or table
            n = 1 << 28  # 512 MiB of float16: read + write
            a = torch.empty(n, dtype=torch.float16, device="cuda")
            b = torch.empty_like(a)
            ms = self.time_ms(lambda: b.copy_(a))
            info["copy_Bps"] = 2 * a.numel() * 2 / (ms / 1e3)
            del a, b
            import triton

            info["triton"] = triton.__version__
        else:
            info.update(device_name="cpu (Triton interpreter)", peak_Bps=None, copy_Bps=None)
        info["torch"] = torch.__version__
        self.info = info
        self.add({"row": "device", **{k: v for k, v in info.items() if k != "device"}})

    def bandwidth(self, nbytes: float, ms: float) -> dict:
        bps = nbytes / (ms / 1e3)
        out = {"bytes": int(nbytes), "GBps": round(bps / 1e9, 1)}
        if self.info.get("peak_Bps"):
            out["frac_peak"] = round(bps / self.info["peak_Bps"], 3)
        if self.info.get("copy_Bps"):
            out["frac_copy"] = round(bps / self.info["copy_Bps"], 3)
        return out

    # -- kernels -------------------------------------------------------------------------------
    def layer_shapes(self):
        if self.smoke:
            return [(64, 128), (96, 64)]
        return [(4096, 4096), (11008, 4096), (4096, 11008)]

    def kernel_rows(self):
        from llmc.backends.triton import kernels
        from llmc.ops import vq
        from llmc.ops.nbits_linear import dequantize, quantize_rtn

        dev, dt = self.device, self.dtype
        gen = torch.Generator().manual_seed(0)
        for N, K in self.layer_shapes():
            shape = f"{N}x{K}"
            w = torch.randn(N, K, generator=gen) * 0.02
            x = torch.randn(1, K, generator=gen).to(dev, dt)
            w16 = w.to(dev, dt)
            ms_fp = self.time_ms(lambda: torch.nn.functional.linear(x, w16))
            base = {"kernel": "fp16_linear" if dev == "cuda" else "fp32_linear", "shape": shape, "batch": 1}
            yield {"row": f"kernel fp16_linear {shape}", **base, "us": round(ms_fp * 1e3, 2),
                   **self.bandwidth(N * K * w16.element_size() + (K + N) * x.element_size(), ms_fp)}
            for bits in (4, 2):
                codes, scales, zeros = quantize_rtn(w, bits, 64)
                ref = x.float().cpu() @ dequantize(codes, scales, zeros, K, bits, 64).T
                c, s, z = codes.to(dev), scales.to(dev, dt), zeros.to(dev)
                y = kernels.nbits_linear(x, c, s, z, K, N, bits, 64)
                err = float((y.float().cpu() - ref).norm() / ref.norm())
                ms = self.time_ms(lambda: kernels.nbits_linear(x, c, s, z, K, N, bits, 64))
                nbytes = c.numel() + s.numel() * s.element_size() + z.numel() + (K + N) * x.element_size()
                yield {"row": f"kernel nbits_gemv {bits}-bit g64 {shape}", "kernel": "nbits_gemv", "shape": shape,
                       "bits": bits, "group": 64, "batch": 1, "us": round(ms * 1e3, 2), "rel_err_vs_ref": err,
                       "speedup_vs_fp16": round(ms_fp / ms, 2), **self.bandwidth(nbytes, ms)}
            for M, B, g in ((2, 8, 8), (1, 16, 8)):
                codes = vq.store_codes(torch.randint(0, 1 << B, (N, K // g, M), generator=gen), B)
                cb = torch.randn(M, 1 << B, 1, g, generator=gen) * 0.01
                sc = torch.rand(N, 1, 1, 1, generator=gen) + 0.5
                ref = x.float().cpu() @ vq.dequantize(codes, cb, sc).T
                c, b_, s = codes.to(dev), cb.to(dev, dt), sc.to(dev, dt)
                y = kernels.vq_linear(x, c, b_, s)
                err = float((y.float().cpu() - ref).norm() / ref.norm())
                ms = self.time_ms(lambda: kernels.vq_linear(x, c, b_, s))
                nbytes = (c.numel() * c.element_size() + b_.numel() * b_.element_size() + N * s.element_size()
                          + (K + N) * x.element_size())
                yield {"row": f"kernel vq_gemv {M}x{B} g{g} {shape}", "kernel": "vq_gemv", "shape": shape,
                       "scheme": f"{M}x{B} g{g}", "batch": 1, "us": round(ms * 1e3, 2), "rel_err_vs_ref": err,
                       "bits_per_weight": round(vq.bits_per_weight(N, K, M, B, g), 3),
                       "speedup_vs_fp16": round(ms_fp / ms, 2), **self.bandwidth(nbytes, ms)}

    def prompt_rows(self):
        from llmc.backends.triton import kernels
        from llmc.ops import vq
        from llmc.ops.nbits_linear import quantize_rtn

        dev, dt = self.device, self.dtype
        gen = torch.Generator().manual_seed(1)
        M = 16 if self.smoke else 128
        N, K = self.layer_shapes()[0]
        w = torch.randn(N, K, generator=gen) * 0.02
        x = torch.randn(M, K, generator=gen).to(dev, dt)
        w16 = w.to(dev, dt)
        flops = 2 * M * N * K
        ms_fp = self.time_ms(lambda: x @ w16.T)
        yield {"row": f"prompt fp16_matmul M={M} {N}x{K}", "us": round(ms_fp * 1e3, 1),
               "TFLOPs": round(flops / ms_fp / 1e9, 2)}
        codes, scales, zeros = quantize_rtn(w, 4, 64)
        c, s, z = codes.to(dev), scales.to(dev, dt), zeros.to(dev)
        ms = self.time_ms(lambda: kernels.nbits_linear(x, c, s, z, K, N, 4, 64))
        yield {"row": f"prompt nbits_gemm 4-bit M={M} {N}x{K}", "us": round(ms * 1e3, 1),
               "TFLOPs": round(flops / ms / 1e9, 2), "vs_fp16": round(ms_fp / ms, 2)}
        vcodes = torch.randint(0, 256, (N, K // 8, 2), generator=gen, dtype=torch.uint8).to(dev)
        cb = (torch.randn(2, 256, 1, 8, generator=gen) * 0.01).to(dev, dt)
        sc = torch.ones(N, 1, 1, 1, device=dev, dtype=dt)
        ms = self.time_ms(lambda: kernels.vq_linear(x, vcodes, cb, sc))
        yield {"row": f"prompt vq_gemm 2x8 g8 M={M} {N}x{K}", "us": round(ms * 1e3, 1),
               "TFLOPs": round(flops / ms / 1e9, 2), "vs_fp16": round(ms_fp / ms, 2)}
        del vq

    def attention_rows(self):
        from llmc.backends.triton import kernels
        from llmc.ops import cq

        dev, dt = self.device, self.dtype
        gen = torch.Generator().manual_seed(2)
        shapes = {"smollm2": (9, 3, 64), "llama2-7b": (32, 32, 128)}
        lengths = (64,) if self.smoke else (4096, 16384)
        for name, (HQ, HKV, D) in shapes.items():
            for T in lengths:
                q = torch.randn(1, HQ, D, generator=gen).to(dev, dt)
                kcb = torch.randn(HKV, D // 4, 256, 4, generator=gen).to(dev, dt)  # 4c8b: 2 bits per channel
                vcb = torch.randn(HKV, D // 4, 256, 4, generator=gen).to(dev, dt)
                kc = torch.randint(0, 256, (1, HKV, T, D // 4), generator=gen, dtype=torch.uint8).to(dev)
                vc = torch.randint(0, 256, (1, HKV, T, D // 4), generator=gen, dtype=torch.uint8).to(dev)
                k = cq.decode(kc, kcb)
                v = cq.decode(vc, vcb)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None].float(), k.float(), v.float(), enable_gqa=HQ != HKV)[:, :, 0]
                out = kernels.cq_attention(q, kc, vc, kcb, vcb)
                err = float((out.float() - ref).norm() / ref.norm())
                ms_fp = self.time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], k, v, enable_gqa=HQ != HKV))
                ms_deq = self.time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, None], kernels.cq_decode(kc, kcb), kernels.cq_decode(vc, vcb), enable_gqa=HQ != HKV))
                ms = self.time_ms(lambda: kernels.cq_attention(q, kc, vc, kcb, vcb))
                code_bytes = kc.numel() + vc.numel()
                yield {"row": f"attention cq 4c8b {name} T={T}", "heads": f"{HQ}/{HKV}x{D}", "context": T,
                       "us_cq_attention": round(ms * 1e3, 1), "us_fp16_sdpa": round(ms_fp * 1e3, 1),
                       "us_cq_decode_then_sdpa": round(ms_deq * 1e3, 1), "rel_err_vs_ref": err,
                       "speedup_vs_fp16_sdpa": round(ms_fp / ms, 2),
                       "cache_bytes_codes": code_bytes, "cache_bytes_fp16": 2 * k.numel() * 2,
                       **self.bandwidth(code_bytes + 2 * kcb.numel() * kcb.element_size(), ms)}

    # -- end to end ----------------------------------------------------------------------------
    def source(self):
        from llmc.models import load_model
        from llmc.testing import tiny_model, tiny_tokenizer

        if getattr(self, "_src", None) is None:
            if self.smoke:
                from llmc.models import SourceModel

                self._src = SourceModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", "")
            else:
                self._src = load_model("smollm2-135m")
        return self._src

    def prompt(self, length: int, seed: int = 3) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        vocab = 256 if self.smoke else 49152
        return torch.randint(10, vocab - 10, (length,), generator=gen).tolist()

    def decode_rate(self, generate, prompt_len: int, new: int) -> dict:
        """(new - 1) / (t(new) - t(1)) after a warm-up of each length (compilation happens there)."""
        t = time.perf_counter()
        generate(prompt_len, 1)
        generate(prompt_len, new)
        self.sync()
        warmup = time.perf_counter() - t
        times = {}
        for n in (1, new, 1, new):
            self.sync()
            t = time.perf_counter()
            generate(prompt_len, n)
            self.sync()
            times.setdefault(n, []).append(time.perf_counter() - t)
        t1, tn = min(times[1]), min(times[new])
        return {"tok_per_s": round((new - 1) / (tn - t1), 1), "warmup_s": round(warmup, 1), "t_first_token_s": round(t1, 4),
                "t_all_s": round(tn, 4), "new_tokens": new, "prompt_tokens": prompt_len}

    def hf_engine(self, compiled: bool):
        import copy

        src = self.source()
        model = copy.deepcopy(src.model).to(self.device, self.dtype).eval()
        kwargs = {"do_sample": False, "pad_token_id": 0}
        if compiled:
            from transformers.generation.configuration_utils import CompileConfig

            kwargs["cache_implementation"] = "static"
            if self.device == "cpu":  # the smoke run: trace with dynamo only (no C++ compiler needed)
                cfg = CompileConfig(backend="eager", mode=None)
                cfg._compile_all_devices = True
                kwargs["compile_config"] = cfg
        else:
            kwargs["disable_compile"] = True

        def generate(prompt_len, n):
            ids = torch.tensor([self.prompt(prompt_len)], device=self.device)
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     **kwargs)
            assert out.shape[1] == prompt_len + n
        return generate, None

    def program(self):
        """SmolLM2 (or the tiny model) traced once; each engine compiles passes on a copy."""
        import copy

        from llmc.api import to_program

        if getattr(self, "_program", None) is None:
            src = self.source()
            self._program = to_program(src.model, src.tokenizer)
        return copy.deepcopy(self._program)

    def llmc_engine(self, passes, calibration=None, vq_random: bool = False):
        from llmc.backends.triton import TritonModel, lower
        from llmc.passes_base import PassContext, PassManager

        program = self.program()
        if passes:
            manager = PassManager(passes)
            manager.check(extra_facts={"calibration"} if calibration is not None else set())
            manager.run(program, PassContext(calibration=calibration, progress=False))
        if vq_random:
            vq_random_codes(program)
        folder = lower(program, os.path.join(tempfile.mkdtemp(prefix="llmc-triton-bench-"), "m"))
        model = TritonModel(folder, compile="eager" if self.smoke else None)

        def generate(prompt_len, n):
            toks = model.generate(self.prompt(prompt_len), n, return_tokens=True, ignore_eos=True)
            assert len(toks) == n
        return generate, model

    def e2e_rows(self):
        """Engines in priority order; an engine measured at both contexts is built once."""
        short, long_ctx = (8, 48) if self.smoke else (128, 4096)
        new = 4 if self.smoke else 64
        new_long = 4 if self.smoke else 32
        scale = 0 if self.smoke else 1
        rtn = "rtn_quant:bits=4,group=64"
        calib = [torch.tensor([self.prompt(128 if self.smoke else 256, seed=10 + i)]) for i in range(2)]
        cq = "cq_kv:config=4c8b,tokens=256,iters=3,calib_sequences=2,fisher=false"
        plans = [  # name, engine, [(row suffix, prompt, new tokens)], estimated seconds, extra fields
            ("e2e hf fp16 eager", lambda: self.hf_engine(False), [("", short, new), (" long", long_ctx, new_long)],
             30, {}),
            ("e2e hf fp16 torch.compile", lambda: self.hf_engine(True), [("", short, new)], 120, {}),
            ("e2e llmc triton rtn4 g64", lambda: self.llmc_engine([rtn]), [("", short, new), (" long", long_ctx,
                                                                                             new_long)],
             150, {"passes": rtn, "cache": "float"}),
            ("e2e llmc triton rtn4 g64 + cq 4c8b", lambda: self.llmc_engine([rtn, cq], calibration=calib),
             [(" long", long_ctx, new_long)], 150,
             {"passes": f"{rtn} {cq}", "cache": "cq 4c8b, 2 bits/channel (codebooks from random tokens: speed only)"}),
            ("e2e llmc triton vq 2x8 g8", lambda: self.llmc_engine([], vq_random=True), [("", short, new)], 150,
             {"codes": "random: speed only"}),
            ("e2e hf fp16 torch.compile", lambda: self.hf_engine(True), [(" long", long_ctx, new_long)], 120, {}),
        ]
        for name, make, contexts, estimate, extra in plans:
            self.guarded(name, self._engine_rows(name, make, contexts, extra), estimate * scale)
        return []

    def _engine_rows(self, name, make, contexts, extra):
        def run():
            t = time.perf_counter()
            generate, model = make()
            setup = round(time.perf_counter() - t, 1)
            for suffix, prompt_len, n in contexts:
                row = {"row": name + suffix, **self.decode_rate(generate, prompt_len, n), "setup_s": setup, **extra}
                if model is not None:
                    row.update(llmc_dtype=str(model.dtype).replace("torch.", ""), compiled=model.compiled)
                yield row
                setup = 0.0
        return run


def vq_random_codes(program, M: int = 2, B: int = 8, g: int = 8, seed: int = 0) -> int:
    """Replace every decoder linear by llmc::vq_linear with random codes and codebooks (AQLM MxB gG), for
    speed measurements only. Codebook entries are scaled so that activations stay finite."""
    from llmc.graph import get_attr_tensor, remove_unused_attrs, set_attr_tensor

    gm = program.gm
    gen = torch.Generator().manual_seed(seed)
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        w_node = node.args[1]
        module = w_node.target.rpartition(".")[0]
        if module.endswith("lm_head"):
            continue
        N, K = get_attr_tensor(gm, w_node).shape
        w = get_attr_tensor(gm, w_node)
        codes = torch.randint(0, 1 << B, (N, K // g, M), generator=gen, dtype=torch.uint8)
        cb = torch.randn(M, 1 << B, 1, g, generator=gen) * float(w.detach().float().std()) / math.sqrt(M)
        scales = torch.ones(N, 1, 1, 1)
        attrs = []
        for leaf, t in (("codes", codes), ("codebooks", cb), ("scales", scales)):
            set_attr_tensor(gm, f"{module}.{leaf}", t, parameter=False)
            with gm.graph.inserting_before(node):
                attrs.append(gm.graph.get_attr(f"{module}.{leaf}"))
        with gm.graph.inserting_before(node):
            y = gm.graph.call_function(torch.ops.llmc.vq_linear.default, (node.args[0], *attrs))
        y.meta = {k: v for k, v in node.meta.items()}
        for a in attrs:
            a.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        out = y
        if len(node.args) > 2 and node.args[2] is not None:
            with gm.graph.inserting_after(y):
                out = gm.graph.call_function(torch.ops.aten.add.Tensor, (y, node.args[2]))
            out.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        done += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    remove_unused_attrs(gm)
    return done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a tiny model (CPU: TRITON_INTERPRET=1)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is present (with --smoke)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start an end-to-end engine only if its estimated time still fits in this many seconds")
    p.add_argument("--name", default=None, help="results file name (default triton_gpu, or triton_gpu_smoke)")
    p.add_argument("--smoke-dir", default=os.path.join(tempfile.gettempdir(), "llmc-triton-gpu-smoke"),
                   help="--smoke writes its JSON here, not to benchmarks/results")
    p.add_argument("--skip-e2e", action="store_true", help="kernel rows only")
    args = p.parse_args(argv)
    args.name = args.name or ("triton_gpu_smoke" if args.smoke else "triton_gpu")
    torch.manual_seed(0)
    bench = Bench(args)
    bench.device_info()
    bench.guarded("kernels", bench.kernel_rows)
    bench.guarded("prompt", bench.prompt_rows)
    bench.guarded("attention", bench.attention_rows)
    if not args.skip_e2e:
        bench.e2e_rows()
    bench.write()
    print(f"wrote {os.path.join(common.RESULTS, args.name + '.json')} in {bench.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
