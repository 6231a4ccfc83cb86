"""Regenerate the results table in README.md from benchmarks/results/*.json (between the markers)."""

from __future__ import annotations

import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _fmt(v, nd=2):
    return "—" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _provenance(row: dict, doc: dict) -> str:
    """The commit a row was measured at, and the CPU's kernel level where recorded (speeds, bf16 and
    even some rounding differ between AVX2 and AVX-512 machines)."""
    com = row.get("commit", doc.get("commit", "?"))
    cpu = (row.get("machine") or doc.get("machine") or {}).get("cpu_capability")
    return f"{com} · {cpu}" if cpu else com


def table() -> str:
    lines = ["| benchmark | row | protocol / measure | value | FP / baseline (same run) | commit · CPU |",
             "|---|---|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))):
        doc = json.load(open(path))
        name, com = doc["benchmark"], doc.get("commit", "?")
        for r in doc["rows"]:
            com = _provenance(r, doc)  # rows merged from several runs carry their own
            if r.get("note"):  # what a row's spec meant when it ran, where that has changed since
                r = {**r, "method": f"{r['method']} ({r['note']})"}
            if "ppl" in r:
                bits = (f", {_fmt(r['bits_per_param'])} bits/param" if r.get("bits_per_param")
                        else f", {_fmt(r['bits_per_weight'])} bits/weight" if r.get("bits_per_weight")
                        else f", {_fmt(r['bits_per_channel'])} bits/channel" if r.get("bits_per_channel") else "")
                if r.get("ffn_params"):  # structured_ffn: what the model stores after pre-merge
                    structured = (f" (factors {r['structured_fraction']:.0%} of dense)"
                                  if r.get("structured_fraction") is not None else "")
                    bits += (f", FFN params {r['ffn_params'] / 1e6:.1f}M = {r['ffn_fraction']:.0%}{structured}, "
                             f"model {r['model_bytes'] / 1e6:.0f} MB")
                lines.append(f"| {name} | {r['method']} | {r['protocol']} ({r['windows']} windows) | "
                             f"ppl {_fmt(r['ppl'])}{bits} | {_fmt(r.get('fp_ppl'))} | {com} |")
            elif r.get("ratio_to_fp32") is not None:
                ppl = f", ORT ppl {_fmt(r['ort_ppl'])} (torch {_fmt(r['torch_ppl'])})" if r.get("ort_ppl") else ""
                if r.get("session_rss_mb"):
                    ppl += f", session RSS {r['session_rss_mb']} MB"
                lines.append(f"| {name} | {r['method']} | tokens/s, median of {len(r['all_tokens_per_s'])}; file MB | "
                             f"{_fmt(r['tokens_per_s'], 1)} ({_fmt(r['ratio_to_fp32'])}× FP32 ORT, "
                             f"{_fmt(r['ratio_to_rtn4'])}× 4-bit ORT); {_fmt(r['file_mb'], 1)} MB{ppl} | "
                             f"{_fmt(r['tokens_per_s'] / r['ratio_to_fp32'], 1)} | {com} |")
            elif r.get("ratio_to_fp_cache") is not None:
                lines.append(f"| {name} | {r['method']} | tokens/s, median of {len(r['all_tokens_per_s'])} | "
                             f"{_fmt(r['tokens_per_s'], 1)} ({_fmt(r['ratio_to_fp_cache'])}× FP cache) | "
                             f"{_fmt(r['fp_cache_tokens_per_s'], 1)} | {com} |")
            elif r.get("tokens_per_s") is not None:
                ratio = r["tokens_per_s"] / r["fp_tokens_per_s"] if r.get("fp_tokens_per_s") else None
                dense = f", {_fmt(r['x_dense_onnx'])}× dense ONNX" if r.get("x_dense_onnx") else ""
                lines.append(f"| {name} | {r['method']} | tokens/s, median of {r.get('repeats')} | "
                             f"{_fmt(r['tokens_per_s'], 1)} ({_fmt(ratio)}× eager{dense}) | "
                             f"{_fmt(r.get('fp_tokens_per_s'), 1)} | {com} |")
            elif "seconds" in r and "median" in r["seconds"]:
                lines.append(f"| {name} | {r['method']} | seconds, median of {r.get('repeats')} | "
                             f"{_fmt(r['seconds']['median'], 3)} | {_fmt(r.get('fp_seconds'), 3)} | {com} |")
        com = _provenance({}, doc)
        for r in doc.get("ffn_latency_decode_torch") or []:  # structured_ffn: one FFN block at one token
            lines.append(f"| {name} | FFN block latency, layer {r['layer']}, {r['method']} | µs at 1 token, median "
                         f"of {r['repeats']} | {_fmt(r['structured_us'], 1)} ({_fmt(r['latency_ratio'])}× dense) | "
                         f"{_fmt(r['dense_us'], 1)} | {com} |")
        for k, v in (doc.get("seconds") or {}).items():
            lines.append(f"| {name} | {k} time | seconds | {_fmt(v, 1)} | — | {com} |")
        if doc.get("onnx_bytes"):
            lines.append(f"| {name} | ONNX file size | MB | {doc['onnx_bytes'] / 1e6:.1f} | — | {com} |")
    return "\n".join(lines)


def main() -> None:
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    open(path, "w").write(text[:start] + "\n" + table() + "\n" + text[end:])
    print(table())


if __name__ == "__main__":
    main()
