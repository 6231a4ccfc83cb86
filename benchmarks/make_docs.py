"""Regenerate docs/results.md, the plots in docs/plots/ and the README's results summary.

    python benchmarks/make_docs.py            # rewrite the generated files
    python benchmarks/make_docs.py --check    # exit 1 if any generated file is out of date

Everything comes from `benchmarks/results/*.json` (one file per benchmark run, see BENCHMARKS.md
"What a benchmark result records"); the peers drawn beside llmc's rows come from
`../shared/BENCHMARKS.md` when that file is there. The script reads JSON and Markdown only: it
does not import llmc, so it runs in any environment with matplotlib. Rows may carry fields this
script does not know; they are shown in the generic tables or ignored, never an error. Output is
deterministic: the same inputs give byte-identical files (fixed figure sizes and dpi, no PNG
software/date metadata, sorted inputs).
"""

from __future__ import annotations

import argparse
import functools
import glob
import io
import json
import math
import os
import re
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import matplotlib.ticker  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCS = os.path.join(ROOT, "docs")
PLOTS = os.path.join(DOCS, "plots")
README = os.path.join(ROOT, "README.md")
BENCHMARKS_MD = os.path.join(os.path.dirname(ROOT), "shared", "BENCHMARKS.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
DPI = 110

# Where each benchmark script's results are discussed (docs/results.md links there).
PAGES = {"foundation": "architecture.md", "onnxruntime_decode": "backends/onnxruntime.md",
         "pv_quant": "passes/pv_quant.md", "vq_linear": "passes/pv_quant.md", "cq_kv": "passes/cq_kv.md",
         "cq_kv_mse": "passes/cq_kv.md", "structured_ffn": "passes/structured_ffn.md", "ircan": "passes/ircan.md",
         "context_tasks": "passes/ircan.md", "ircan_eval": "passes/ircan.md", "calibration_cost": "architecture.md", "guidance": "passes/fuse_guidance.md", "guidance_ort": "passes/fuse_guidance.md", "qbb_quant": "passes/qbb_quant.md",
         "decode_shapes": "backends/onnxruntime.md"}
ORDER = ["foundation", "onnxruntime_decode", "pv_quant", "vq_linear", "cq_kv", "cq_kv_mse", "structured_ffn", "ircan", "context_tasks", "ircan_eval", "calibration_cost", "guidance", "guidance_ort", "qbb_quant", "decode_shapes"]

# Pass defaults that changed after some rows were measured, where the row does not say so itself
# (pv_quant rows carry a `note` instead): (pass, option, the old default, commits measured before
# the change). A matching row whose spec does not name the option gets a note, and the plots use
# the old value.
OLD_DEFAULTS = [("cq_kv", "exact_current", "false", ("88fd575", "a86da10"))]
# Changes after which a pass's earlier results no longer reproduce: (pass, the commit that changed it,
# what changed). A row of that pass measured at an earlier commit is marked stale in docs/results.md
# and the README until it is re-run.
RESULTS_CHANGED: list[tuple[str, str, str]] = [
    ("cq_kv", "19e64a8", "calibration was streamed block by block with mini-batch k-means"),
]

# The README's results summary: (results file, row id or method, what to call it). A row that is
# missing is skipped with a warning.
HEADLINES = [
    ("foundation", "torch (traced)", "FP32 SmolLM2-135M-Instruct, ppl-512x40 (traced graph)"),
    ("pv_quant", "scalar4-p", "pv_quant scalar 4-bit g64 + PV-Tuning (P step)"),
    ("pv_quant", "scalar3-clip20-b16-t120-w2048", "pv_quant scalar 3-bit g64, batch 16 over 2,048 windows"),
    ("pv_quant", "2x8g8-pv-cl2e-2-b8-w2048", "pv_quant AQLM 2x8 g8 + PV-Tuning, batch 8 over 2,048 windows"),
    ("pv_quant", "ort-2x8g8-pv-cl2e-2-b8-w2048", "the same 2-bit model in ONNX Runtime (llmc.VQLinear)"),
    ("cq_kv_40w", "cq-4c8b-x", "cq_kv 4c8b: KV cache at 2 bits per channel"),
    ("cq_kv_40w", "kivi-2-x", "KIVI-2 baseline (uniform_kv:mode=kivi)"),
    ("onnxruntime_decode_rtn4_all_int8",
     "onnxruntime rtn_quant:bits=4,group=64,lm_head=true,embeddings=true + int8_activations (llmc OrtModel)",
     "rtn_quant 4-bit everywhere + int8_activations, ONNX Runtime"),
    ("structured_ffn_layerwise_400", "structured_ffn blockdense 63% layerwise init + 400 recovery steps",
     "structured_ffn block-dense, 63% of FFN parameters"),
    ("qbb_quant", "n4-s12-ef", "qbb_quant N=4 pure binary bases, error-fed joint rounding (stages 1-2)"),
    ("qbb_quant", "n4-g192-o4-s123-ef-p", "qbb_quant N=4, scales per 192 inputs, 4 outliers/row, stage 3 as PV-Tuning's P step"),
    ("qbb_quant", "n3-g192-o4-s123-ef-p", "qbb_quant N=3, scales per 192 inputs, 4 outliers/row, stage 3 as PV-Tuning's P step"),
    ("qbb_quant", "ort-n4-o4-s123-ef-wiki", "qbb_quant N=4, 4 outliers/row, in ONNX Runtime (llmc.BinaryBasesLinear)"),
    ("decode_shapes", "fp32-b1-p128", "FP32 in ONNX Runtime (GroupQueryAttention, shared cache buffers)"),
    ("decode_shapes", "genai-fp32-b1-p128", "onnxruntime-genai's own FP32 build, same run"),
    ("decode_shapes", "int4-int8-b1-p128", "all 4-bit + int8 activations in ONNX Runtime"),
    ("decode_shapes", "pv4-gh32-int8-b1-p128",
     "pv_quant 4-bit + GPTQ 4-bit lm_head + int8 activations in ONNX Runtime, same run"),
    ("decode_shapes", "genai-int4-b1-p128", "onnxruntime-genai's own int4 build, same run"),
    ("decode_shapes", "int4-int8-b8-p128", "all 4-bit + int8 activations in ONNX Runtime"),
    ("decode_shapes", "pv4-gh32-int8-b8-p128",
     "pv_quant 4-bit + GPTQ 4-bit lm_head + int8 activations in ONNX Runtime, same run"),
    ("decode_shapes", "genai-int4-b8-p128", "onnxruntime-genai's own int4 build, same run"),
    ("decode_shapes", "fp32-b8-p2048", "FP32 in ONNX Runtime, float KV cache"),
    ("decode_shapes_cq", "fp32-b8-p2048", "FP32 in ONNX Runtime, float KV cache (the code cache's run)"),
    ("decode_shapes_cq", "cq4c8b-b8-p2048",
     "FP32 + cq_kv 4c8b in ONNX Runtime (llmc.CQCachedAttention reads and writes the codes), same run"),
]


# ----------------------------------------------------------------------------------------------
# Reading


def load_results() -> list[dict]:
    """Every results file, sorted by name; each doc gets `_file` (its name without .json).

    A JSON file that is not a results document (no `rows` list: e.g. per-step traces kept beside
    the results) is skipped.
    """
    docs = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*.json"))):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            print(f"make_docs: {os.path.relpath(path, ROOT)} has no rows; skipped", file=sys.stderr)
            continue
        doc["_file"] = os.path.splitext(os.path.basename(path))[0]
        doc.setdefault("benchmark", doc["_file"])
        doc["rows"] = [r for r in doc.get("rows") or [] if isinstance(r, dict)]
        docs.append(doc)
    return docs


def script_of(doc: dict) -> str:
    """The benchmark script that wrote a doc (`benchmarks/NAME.py` in its command), else its name."""
    m = re.search(r"benchmarks/(\w+)\.py", doc.get("command") or "")
    return m.group(1) if m else doc["benchmark"]


def num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def commit_of(row: dict, doc: dict) -> str:
    return str(row.get("commit") or doc.get("commit") or "?")


def cpu_of(row: dict, doc: dict) -> str | None:
    """The CPU's kernel level (AVX2, AVX512) where the row's run recorded it: a row's own machine
    record, else the file's when the row is from the file's run (no commit of its own, or the same)."""
    if isinstance(row.get("machine"), dict):
        m = row["machine"]
    elif row.get("commit") in (None, doc.get("commit")):
        m = doc.get("machine")
    else:
        m = None
    return str(m["cpu_capability"]) if isinstance(m, dict) and m.get("cpu_capability") else None


def legacy_note(row: dict, doc: dict) -> str | None:
    """A note for a row measured under an old default that its spec does not name (OLD_DEFAULTS)."""
    commit = commit_of(row, doc).replace("-dirty", "")
    for pass_name, option, old, commits in OLD_DEFAULTS:
        if commit not in commits:
            continue
        for spec in row.get("passes") or []:
            if isinstance(spec, str) and spec.split(":")[0] == pass_name and f"{option}=" not in spec:
                return f"measured when {option} defaulted to {old}: as {option}={old}"
    return None


@functools.lru_cache(maxsize=None)
def is_ancestor(commit: str, of: str) -> bool | None:
    """Whether `commit` is an ancestor of (or is) `of` in this repository; None when git cannot tell."""
    try:
        proc = subprocess.run(["git", "merge-base", "--is-ancestor", commit, of], cwd=ROOT, capture_output=True)
    except OSError:
        return None
    return {0: True, 1: False}.get(proc.returncode)


def stale_note(row: dict, doc: dict) -> str | None:
    """A note for a row of a pass that changed after the row was measured (RESULTS_CHANGED)."""
    commit = commit_of(row, doc).replace("-dirty", "")
    for pass_name, changed, what in RESULTS_CHANGED:
        uses = any(isinstance(spec, str) and spec.split(":")[0] == pass_name for spec in row.get("passes") or [])
        if uses and commit != changed and is_ancestor(commit, changed):
            return f"STALE: measured before {what} ({changed}), not re-run since"
    return None


def note_of(row: dict, doc: dict) -> str | None:
    notes = [n for n in (row.get("note") or legacy_note(row, doc), stale_note(row, doc)) if n]
    return "; ".join(notes) or None


def spec_option(row: dict, pass_name: str, option: str, default: str | None = None) -> str | None:
    """The value of `option` in the row's spec of `pass_name` (the old default for legacy rows)."""
    for spec in row.get("passes") or []:
        if not isinstance(spec, str) or spec.split(":")[0] != pass_name:
            continue
        m = re.search(rf"(?:^|[:,]){option}=([^,]+)", spec)
        return m.group(1) if m else default
    return None


def peers(path: str = BENCHMARKS_MD) -> dict[str, dict]:
    """The peers' tables of BENCHMARKS.md: {"weights": {"fp": ..., "rows": [...]}, "kv": {...}}.

    Each row: (method, bits, ppl, approximate). Missing file: empty dict.
    """
    if not os.path.exists(path):
        print(f"make_docs: {path} not found; plots are drawn without the peers", file=sys.stderr)
        return {}
    text = open(path, encoding="utf-8").read()
    out = {}
    for key, heading in (("weights", "Weight quantization of all decoder linears"), ("kv", "KV cache (")):
        start = text.find(heading)
        if start < 0:
            continue
        fp = (re.search(r"FP = ([\d.]+)", text[start: start + 300])  # in the table's own heading,
              or re.search(r"FP = ([\d.]+)", text[max(0, start - 400): start]))  # else the section's
        rows, seen_table = [], False
        for line in text[start:].splitlines()[1:]:
            if not line.startswith("|"):
                if seen_table:
                    break
                continue
            seen_table = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 3 or set(cells[1]) <= set("-: ") or cells[0] == "method" or cells[0].startswith("method"):
                continue
            bits_s, ppl_s = cells[1], cells[2]
            try:
                bits = float(bits_s.lstrip("~"))
                ppl = float(ppl_s.replace(",", ""))
            except ValueError:
                continue
            name = re.sub(r"\s*—\s*\*\*.*?\*\*", "", cells[0]).replace("**", "")
            rows.append({"method": name, "bits": bits, "ppl": ppl, "approx": bits_s.startswith("~")})
        out[key] = {"fp": float(fp.group(1)) if fp else None, "rows": rows}
    return out


# ----------------------------------------------------------------------------------------------
# Formatting


def fmt(v, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 10000:
            return f"{v:,.0f}"
        if 0 < abs(v) < 0.1:
            return f"{v:.3g}"  # relative errors, fractions: keep three significant digits
        return f"{v:.{nd}f}"
    return str(v)


def cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return lines


def provenance(row: dict, doc: dict) -> str:
    cpu = cpu_of(row, doc)
    return f"{commit_of(row, doc)} · {cpu}" if cpu else commit_of(row, doc)


def seconds_text(row: dict) -> str | None:
    s = row.get("seconds")
    if not isinstance(s, dict):
        return None
    parts = [f"{k} {fmt(num(v), 0)} s" for k, v in s.items() if k != "eval" and num(v) is not None]
    return ", ".join(parts) or None


def method_text(row: dict, doc: dict) -> str:
    m = str(row.get("method") or row.get("row") or "")
    note = note_of(row, doc)
    return f"{m} ({note})" if note else m


def bits_param(row: dict) -> float | None:
    """Stored bits per parameter of the compressed linears, as the size report counts them."""
    return num(row.get("bits_per_param")) or num(row.get("decoder_linear_bits_per_param"))


# Columns of a quality table: (header, row -> value); a column is shown when any row has a value.
QUALITY_COLUMNS = [
    ("row", lambda r, d: r.get("row")),
    ("spec / method", lambda r, d: method_text(r, d)),
    ("protocol", lambda r, d: f"{r.get('protocol')} ({r.get('windows')} w)" if r.get("protocol") else None),
    ("ppl", lambda r, d: num(r.get("ppl"))),
    ("× FP", lambda r, d: (num(r.get("ppl")) / num(r.get("fp_ppl")))
     if num(r.get("ppl")) and num(r.get("fp_ppl")) else None),
    ("FP ppl", lambda r, d: num(r.get("fp_ppl"))),
    ("torch ppl", lambda r, d: num(r.get("torch_ppl"))),
    ("ppl-512x40", lambda r, d: num(r.get("ppl_512x40"))),
    ("bits/weight", lambda r, d: num(r.get("bits_per_weight"))),
    ("bits/param (stored)", lambda r, d: bits_param(r)),
    ("bits/channel", lambda r, d: num(r.get("bits_per_channel"))),
    ("KV B/token/layer", lambda r, d: num(r.get("kv_bytes_per_token_per_layer"))),
    ("tokens in 1 GiB", lambda r, d: r.get("max_context_1gib_batch1")),
    ("FFN params", lambda r, d: f"{r['ffn_fraction']:.0%}" + (f" (factors {r['structured_fraction']:.0%})"
                                                               if num(r.get("structured_fraction")) else "")
     if num(r.get("ffn_fraction")) else None),
    ("model MB", lambda r, d: num(r.get("model_bytes")) / 1e6 if num(r.get("model_bytes")) else None),
    ("time", lambda r, d: seconds_text(r)),
    ("peak RSS MB", lambda r, d: r.get("peak_rss_mb")),
    ("commit · CPU", lambda r, d: provenance(r, d)),
]


def ratios_text(r: dict) -> str | None:
    parts = []
    tps = num(r.get("tokens_per_s"))
    if tps and num(r.get("fp_tokens_per_s")):
        parts.append(f"{tps / r['fp_tokens_per_s']:.2f}× HF eager ({fmt(num(r['fp_tokens_per_s']), 1)})")
    if num(r.get("ratio_to_fp32")):
        parts.append(f"{r['ratio_to_fp32']:.2f}× ORT FP32")
    if num(r.get("ratio_to_rtn4")):
        parts.append(f"{r['ratio_to_rtn4']:.2f}× ORT 4-bit")
    if num(r.get("ratio_to_fp_cache")):
        parts.append(f"{r['ratio_to_fp_cache']:.2f}× FP cache ({fmt(num(r.get('fp_cache_tokens_per_s')), 1)})")
    if num(r.get("x_dense_onnx")):
        parts.append(f"{r['x_dense_onnx']:.2f}× dense ONNX ({fmt(num(r.get('dense_onnx_tokens_per_s')), 1)})")
    return "; ".join(parts) or None


def rounds(r: dict) -> int | None:
    if isinstance(r.get("repeats"), int):
        return r["repeats"]
    return len(r["all_tokens_per_s"]) if isinstance(r.get("all_tokens_per_s"), list) else None


SPEED_COLUMNS = [
    ("row", lambda r, d: r.get("row")),
    ("engine / spec", lambda r, d: method_text(r, d)),
    ("tok/s", lambda r, d: fmt(num(r.get("tokens_per_s")), 1)),
    ("median of", lambda r, d: rounds(r)),
    ("compared in the same run", lambda r, d: ratios_text(r)),
    ("file MB", lambda r, d: num(r.get("file_mb")) or (num(r.get("onnx_bytes")) / 1e6 if num(r.get("onnx_bytes"))
                                                       else None)),
    ("session RSS MB", lambda r, d: r.get("session_rss_mb")),
    ("ORT ppl (torch)", lambda r, d: f"{fmt(num(r['ort_ppl']))} ({fmt(num(r.get('torch_ppl')))})"
     if num(r.get("ort_ppl")) else None),
    ("same tokens", lambda r, d: next((r[k] for k in ("tokens_identical_to_hf", "tokens_identical_to_ort",
                                                      "same_tokens_as_fp_cache") if k in r), None)),
    ("commit · CPU", lambda r, d: provenance(r, d)),
]


def column_table(columns, rows: list[dict], doc: dict) -> list[str]:
    keep = [(h, f) for h, f in columns if any(f(r, doc) not in (None, "", "—") for r in rows)]
    return table([h for h, _ in keep], [[f(r, doc) for _, f in keep] for r in rows])


def flatten(d: dict, skip=("machine", "versions", "passes")) -> dict:
    """One level of nested dicts as `key.sub`; long lists (per-step traces) and skipped keys dropped."""
    out = {}
    for k, v in d.items():
        if k in skip or k.startswith("all_"):
            continue
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if not isinstance(v2, (dict, list)):
                    out[f"{k}.{k2}"] = v2
        elif isinstance(v, list):
            if len(v) <= 4 and all(not isinstance(x, (dict, list)) for x in v):
                out[k] = " × ".join(map(str, v))
        else:
            out[k] = v
    return out


def generic_table(rows: list[dict], doc: dict | None = None) -> list[str]:
    flat = [flatten(r) for r in rows]
    headers: list[str] = []
    for f in flat:
        headers += [k for k in f if k not in headers and k not in ("commit", "date")]
    body = [[f.get(h) for h in headers] for f in flat]
    if doc is not None and any("commit" in r for r in rows):
        headers.append("commit · CPU")
        for b, r in zip(body, rows):
            b.append(provenance(r, doc))
    return table(headers, body)


def is_quality(r: dict) -> bool:
    return num(r.get("ppl")) is not None


def is_speed(r: dict) -> bool:
    return not is_quality(r) and num(r.get("tokens_per_s")) is not None


PROVENANCE_KEYS = {"benchmark", "command", "commit", "date", "machine", "versions", "model", "model_sha256",
                   "data_sha256", "rows", "_file"}


def doc_section(doc: dict) -> list[str]:
    lines = [f"### {doc['_file']}", ""]
    m = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    machine = ", ".join(f"{k} {v}" for k, v in m.items())
    versions = doc.get("versions") if isinstance(doc.get("versions"), dict) else {}
    lines.append(f"- command: `{doc.get('command', '?')}`")
    lines.append(f"- commit {doc.get('commit', '?')} · {doc.get('date', '?')} · machine: {machine or '?'}")
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    model = doc.get("model")
    if model:
        sha = str(doc.get("model_sha256") or "")[:12]
        lines.append(f"- model: {model}" + (f" (sha256 {sha}…)" if sha else ""))
    facts = []
    for k, v in doc.items():
        if k in PROVENANCE_KEYS or isinstance(v, list):
            continue
        if isinstance(v, dict):
            if all(not isinstance(x, (dict, list)) for x in v.values()):
                facts.append(f"{k}: " + ", ".join(f"{k2} {fmt(x) if not isinstance(x, str) else x}"
                                                  for k2, x in v.items()))
        else:
            v = f"{v / 1e6:.1f} MB" if k.endswith("_bytes") and num(v) else fmt(v)
            facts.append(f"{k}: {v}")
    if facts:
        lines.append("- run: " + "; ".join(facts))
    lines.append("")
    rows = doc["rows"]
    quality = [r for r in rows if is_quality(r)]
    speed = [r for r in rows if is_speed(r)]
    other = [r for r in rows if not is_quality(r) and not is_speed(r)]
    if quality:
        lines += column_table(QUALITY_COLUMNS, quality, doc) + [""]
    if speed:
        lines += column_table(SPEED_COLUMNS, speed, doc) + [""]
    kinds: dict[tuple, list[dict]] = {}  # rows of other kinds, one table per set of fields
    for r in other:
        kinds.setdefault(tuple(sorted(flatten(r))), []).append(r)
    for group in kinds.values():
        lines += generic_table(group, doc) + [""]
    for k, v in doc.items():  # doc-level tables (e.g. FFN block latency, per-bits summaries)
        if k in PROVENANCE_KEYS:
            continue
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v) and len(v) <= 50:
            lines += [f"{k}:", ""] + generic_table(v) + [""]
        elif isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values()):
            lines += [f"{k}:", ""] + generic_table([{"": k2, **x} for k2, x in v.items()]) + [""]
    return lines


# ----------------------------------------------------------------------------------------------
# Plots


def place_labels(ax, points, fontsize=7.0, obstacles=()):
    """Write each (x, y, text, color) next to its point where it overlaps no other label or point.

    Candidates right of the point, then left, each shifted up and down by half-line steps; the
    first free one wins (a thin leader line when it moved). Deterministic and approximate: a
    label's box is estimated from its length (no renderer), in display pixels.
    """
    fig = ax.figure
    pt = fig.dpi / 72.0
    h = fontsize * 1.3 * pt
    anchors = [tuple(ax.transData.transform((x, y))) for x, y, _, _ in points]
    markers = anchors + [tuple(ax.transData.transform(o)) for o in obstacles]
    taken = [(X - 3 * pt, Y - 3 * pt, 6 * pt, 6 * pt) for X, Y in markers]
    x0, y0, x1, y1 = ax.bbox.extents
    shifts = [0.0] + [s * k for k in range(1, 13) for s in (0.5, -0.5)]
    for (x, y, text, color), (X, Y) in sorted(zip(points, anchors), key=lambda p: (p[0][1], p[0][0], p[0][2])):
        w = len(text) * fontsize * 0.56 * pt
        best = None
        for side in (1, -1):
            for s in shifts:
                lx = X + 5 * pt if side > 0 else X - 5 * pt - w
                ly = Y - h / 2 + s * h
                box = (lx, ly, w, h)
                inside = x0 <= lx and lx + w <= x1 + 40 * pt and y0 <= ly and ly + h <= y1 + 12 * pt
                if inside and not any(lx < bx + bw and bx < lx + w and ly < by + bh and by < ly + h
                                      for bx, by, bw, bh in taken):
                    best = box
                    break
            if best:
                break
        if best is None:
            best = (X + 5 * pt, Y - h / 2, w, h)
        taken.append(best)
        lx, ly, w, _ = best
        tx, ty = ax.transData.inverted().transform((lx, ly + h / 2))
        moved = abs(ly + h / 2 - Y) > 0.6 * h
        ax.annotate(text, (x, y), xytext=(tx, ty), textcoords="data", fontsize=fontsize, color=color,
                    va="center", ha="left", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", lw=0.4, color=color, alpha=0.7, shrinkA=0, shrinkB=2)
                    if moved else None)


def save_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]


def weight_family(specs: list[str]) -> str:
    if any("format=scalar" in s for s in specs):
        return "pv_quant, scalar codes (nbits_linear)"
    if any(s.startswith("pv_quant") for s in specs):
        return "pv_quant, AQLM vector codes (vq_linear)"
    if any(s.startswith("rtn_quant") for s in specs):
        return "rtn_quant (+ int8_activations), ORT ppl"
    if any(s.startswith("gptq_quant") for s in specs):
        return "gptq_quant"
    if any(s.startswith("qbb_quant") for s in specs):
        return "qbb_quant, binary bases (binary_bases_linear)"
    return "other"


def weight_rows(docs: list[dict]) -> list[dict]:
    """llmc's weight-quantization rows: a perplexity, its FP perplexity and stored bits/param < 32."""
    out = []
    for doc in docs:
        for r in doc["rows"]:
            bits = bits_param(r) or num(r.get("bits_per_weight"))
            if not is_quality(r) or not bits or bits >= 32 or r.get("bits_per_channel") is not None:
                continue
            if not num(r.get("fp_ppl")):
                continue
            specs = [s for s in r.get("passes") or [] if isinstance(s, str)]
            label = r.get("row") or " + ".join(s.replace("rtn_quant:bits=4,group=64", "rtn4")
                                               .replace(",lm_head=true", " lm_head").replace(",embeddings=true", " emb")
                                               .replace("int8_activations", "int8") for s in specs)
            out.append({"bits": bits, "x_fp": r["ppl"] / r["fp_ppl"], "ppl": r["ppl"], "family": weight_family(specs),
                        "label": str(label or r.get("method")), "file": doc["_file"],
                        "protocol": f"{r.get('protocol')} (FP {r['fp_ppl']:.2f})"})
    return out


def pareto(points: list[dict], x="bits", y="x_fp") -> list[int]:
    """Indices of the points no other point beats on both x (fewer bits) and y (lower ppl)."""
    return [i for i, p in enumerate(points)
            if not any((q[x] <= p[x] and q[y] < p[y]) or (q[x] < p[x] and q[y] <= p[y]) for q in points)]


def plot_ppl_vs_bits(docs: list[dict], peer: dict) -> bytes:
    pts = weight_rows(docs)
    top, xmin, xmax = 4.0, 2.0, 5.0
    fig, ax = plt.subplots(figsize=(13, 7))
    fig.subplots_adjust(left=0.06, right=0.64, top=0.93, bottom=0.08)
    families = sorted({p["family"] for p in pts})
    labels = []
    for fam, color in zip(families, COLORS):
        sel = [p for p in pts if p["family"] == fam]
        ax.scatter([p["bits"] for p in sel], [min(p["x_fp"], top) for p in sel], s=24, color=color, zorder=3,
                   edgecolors="none", label=f"llmc: {fam} ({len(sel)} rows)")
        front = pareto(sel)
        for i, p in enumerate(sel):
            if p["x_fp"] > top:
                ax.scatter([p["bits"]], [top], marker="^", s=45, color=color, zorder=4)
                labels.append((p["bits"], top, f"{p['label']} {p['ppl']:,.0f}", color))
            elif i in front:
                labels.append((p["bits"], p["x_fp"], f"{p['label']} {p['ppl']:.2f}", color))
    rows = (peer.get("weights") or {}).get("rows") or []
    fp = (peer.get("weights") or {}).get("fp")
    legend_lines = []
    if rows and fp:
        for i, r in enumerate(rows, 1):
            xf = r["ppl"] / fp
            x, y = min(r["bits"], xmax), min(xf, top)
            mk = ">" if r["bits"] > xmax else "^" if xf > top else "*"
            ax.scatter([x], [y], marker=mk, s=90 if mk == "*" else 45, color="black", zorder=5,
                       label="peers of BENCHMARKS.md (ppl-512x5; list at right)" if i == 1 else None)
            labels.append((x, y, f"P{i}", "black"))
            legend_lines.append(f"P{i}  {r['method']}:\n       {'~' if r['approx'] else ''}{r['bits']:g} bits, "
                                f"ppl {r['ppl']:,.2f} ({xf:,.2f}× FP)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.text(xmin + 0.03, 1.01, "FP", fontsize=8, color="grey", va="bottom")
    ax.set_ylim(0.95, top + 0.2)
    ax.set_xlim(xmin, xmax)
    place_labels(ax, labels, obstacles=[(p["bits"], min(p["x_fp"], top)) for p in pts])
    ax.set_xlabel("stored bits per parameter of the decoder linears (codes, codebooks, scales, zero points)")
    ax.set_ylabel("perplexity ÷ FP perplexity (same protocol)")
    ax.set_title("Weight quantization of SmolLM2-135M: perplexity vs bits per parameter", fontsize=11)
    ax.grid(True, lw=0.3, alpha=0.5)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.95)
    protocols = ", ".join(sorted({p["protocol"] for p in pts}))
    text = (f"llmc rows: {protocols}. Labelled: each family's rows that\n"
            "no row of the family beats on both bits and perplexity; ▲ above\n"
            "the plot, ► right of it. llmc stores scales and codebooks in\n"
            "float32; docs/results.md also gives bits/weight with them\n"
            "counted as 16-bit, as AQLM and the peers count them.\n\n"
            f"Peers (BENCHMARKS.md, ppl-512x5, FP {fp}):\n" + "\n".join(legend_lines))
    fig.text(0.655, 0.93, text, fontsize=7.2, va="top", ha="left")
    return save_png(fig)


# KV plot: one colour per method, one marker per variant of it ("o" for the main configuration).
KV_MAIN = ("cq_kv", "cq_kv window=128", "cq_kv fisher=false", "KIVI (uniform_kv:mode=kivi)", "uniform_kv static")


def kv_color(family: str) -> str:
    if family.startswith("KIVI"):
        return "#d62728"
    if family.startswith("uniform_kv"):
        return "#7f7f7f"
    if "window" in family or "sink" in family:
        return "#2ca02c"
    return "#17becf" if "fisher=false" in family else "#1f77b4"


def kv_styles(families: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for color in sorted({kv_color(f) for f in families}):
        group = [f for f in families if kv_color(f) == color]
        others = iter("sDv^<>ph")
        for f in sorted(group, key=lambda f: (f not in KV_MAIN, f)):
            out[f] = (color, "o" if f in KV_MAIN else next(others, "x"))
    return out


def kv_rows(docs: list[dict], windows: int) -> list[dict]:
    out = []
    for doc in docs:
        for r in doc["rows"]:
            bits = num(r.get("bits_per_channel"))
            if not is_quality(r) or bits is None or bits >= 32 or r.get("windows") != windows:
                continue
            specs = [s for s in r.get("passes") or [] if isinstance(s, str)]
            if not specs:
                continue
            name = specs[0].split(":")[0]
            if name == "cq_kv":
                exact = spec_option(r, "cq_kv", "exact_current",
                                    "false" if legacy_note(r, doc) else "true") == "true"
                fisher = spec_option(r, "cq_kv", "fisher", "true") == "true"
                window = spec_option(r, "cq_kv", "window", "0")
                sink = spec_option(r, "cq_kv", "sink", "0")
                fam = ("cq_kv" + ("" if fisher else " fisher=false") + (f" window={window}" if window != "0" else "")
                       + (f" sink={sink}" if sink != "0" else ""))
            elif name == "uniform_kv":
                mode = spec_option(r, "uniform_kv", "mode", "static")
                exact = spec_option(r, "uniform_kv", "exact_current", "false") == "true"
                extra = [f"{o}={spec_option(r, 'uniform_kv', o)}" for o in ("group", "value_group", "residual")
                         if spec_option(r, "uniform_kv", o) is not None]
                fam = (("KIVI (uniform_kv:mode=kivi)" if mode == "kivi" else "uniform_kv static")
                       + (" " + ",".join(extra) if extra else ""))
            else:
                fam, exact = name, False
            out.append({"bits": bits, "ppl": r["ppl"], "fp": num(r.get("fp_ppl")), "family": fam, "exact": exact,
                        "label": str(r.get("row") or specs[0])})
    return out


def plot_ppl_vs_kv_bits(docs: list[dict], peer: dict) -> bytes:
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(14, 8.2))
    fig.subplots_adjust(left=0.05, right=0.985, top=0.91, bottom=0.33, wspace=0.12)
    fams = sorted({p["family"] for w in (5, 40) for p in kv_rows(docs, w)})
    style = kv_styles(fams)
    yticks = [30, 32, 35, 40, 50, 60, 80, 100, 150, 200]
    for ax, windows in zip(axes, (5, 40)):
        pts = kv_rows(docs, windows)
        fp = next((p["fp"] for p in pts if p["fp"]), None) or 29.0
        top = 200.0
        labels = []
        for fam in fams:
            color, marker = style[fam]
            for exact in (True, False):
                sel = sorted((p for p in pts if p["family"] == fam and p["exact"] == exact), key=lambda p: p["bits"])
                inside = [p for p in sel if p["ppl"] <= top]
                if len(inside) > 1:
                    ax.plot([p["bits"] for p in inside], [p["ppl"] for p in inside], ls="-" if exact else ":",
                            lw=0.9, color=color, zorder=2)
                for p in sel:
                    y = min(p["ppl"], top)
                    ax.scatter([p["bits"]], [y], marker="^" if p["ppl"] > top else marker, s=30,
                               facecolors=color if exact else "white", edgecolors=color, linewidths=1.0, zorder=3)
                    text = f"{p['ppl']:,.0f}" if p["ppl"] > top else f"{p['ppl']:.1f}"
                    labels.append((p["bits"], y, text, color))
        kv_peer = peer.get("kv") or {}
        if windows == 5 and kv_peer.get("rows"):
            for i, r in enumerate(kv_peer["rows"], 1):
                x, y = r["bits"] - 0.12, min(r["ppl"], top)
                ax.scatter([x], [y], marker="*", s=70, color="black", zorder=5)
                labels.append((x, y, f"K{i}", "black"))
        ax.set_yscale("log")
        ax.set_ylim(fp * 0.97, top * 1.15)
        ax.set_yticks(yticks)
        ax.set_yticklabels([str(t) for t in yticks])
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(0.6, 5.8)
        ax.set_xticks([1, 2, 3, 4, 5])
        ax.axhline(fp, color="grey", lw=0.8, ls="--")
        ax.text(0.65, fp * 1.005, f"FP {fp:.2f}", fontsize=8, color="grey", va="bottom")
        place_labels(ax, labels, fontsize=6.5, obstacles=[(p["bits"], min(p["ppl"], top)) for p in pts])
        ax.set_xlabel("KV-cache bits per channel (KIVI: codes + fp16 scales and zero points)")
        ax.set_title(f"ppl-512x{windows}-kv: {windows} windows, prefill 256 then chunks of 32 through the cache",
                     fontsize=10)
        ax.grid(True, lw=0.3, alpha=0.5)
    axes[0].set_ylabel("perplexity (log scale; ▲ = above 200)")
    fig.suptitle("KV-cache quantization of SmolLM2-135M: perplexity vs bits per channel", fontsize=12)
    handles = [Line2D([], [], color=style[f][0], marker=style[f][1], lw=0.9) for f in fams]
    fig.legend(handles, fams, loc="upper left", bbox_to_anchor=(0.04, 0.25), fontsize=7.5, ncol=2, frameon=False)
    fig.text(0.05, 0.045, "Filled marker, solid line: a step's own tokens attend to each other unquantized "
             "(exact_current=true, cq_kv's default).\nHollow marker, dotted line: every key and value is read back "
             "from codes (exact_current=false, the CQ paper's protocol).\n★: peers of BENCHMARKS.md "
             "(ppl-512x5-kv, left panel), listed at right.", fontsize=7.5, va="bottom")
    kv_peer = peer.get("kv") or {}
    if kv_peer.get("rows"):
        lines = [f"K{i}  {r['method'][:110]}: {r['bits']:g} bits, ppl {r['ppl']:.2f}"
                 for i, r in enumerate(kv_peer["rows"], 1)]
        txt = f"Peers (BENCHMARKS.md, ppl-512x5-kv, FP {kv_peer.get('fp')}):\n" + "\n".join(lines)
        fig.text(0.53, 0.245, txt, fontsize=7.2, va="top", ha="left")
    return save_png(fig)


def decode_label(r: dict, method: str) -> str:
    fused = {True: " fused", False: " unfused"}.get(r.get("fuse"), "")  # rows of a --fuse both run
    return _decode_label(r, method) + (fused if "fused)" in method else "")


def _decode_label(r: dict, method: str) -> str:
    specs = [s for s in r.get("passes") or [] if isinstance(s, str)]
    if specs:
        parts = []
        for s in specs:
            if s.startswith("structured_ffn"):
                o = dict(kv.split("=", 1) for kv in s.split(":", 1)[1].split(",") if "=" in kv)
                steps = f" +{o['steps']} steps" if o.get("steps", "0") != "0" else ""
                parts.append(f"sffn {o.get('kind', '')} {float(o.get('budget', 0)):.0%} {o.get('init', '')}{steps}")
            else:
                parts.append(s.replace("rtn_quant:bits=4,group=64", "rtn4").replace(",lm_head=true", " lm_head")
                             .replace(",embeddings=true", " emb").replace("int8_activations", "int8"))
        return " + ".join(parts)
    name = str(r.get("row") or method)
    name = re.sub(r"^(ort|genai)-", "", name)
    if "genai builder" in method:
        return "genai int4" if "int4" in method else "genai FP32"
    if "FP32" in method or name == "fp32":
        return "FP32"
    return (name.replace("2x8g8-pv-cl2e-2-b8-w2048", "2x8g8 PV").replace("rtn-4", "rtn4")
            .replace("-dequantize", " (dequantize)"))


def decode_points(docs: list[dict]) -> list[dict]:
    """Decode rows with the size of the ONNX file they ran: tok/s, MB, engine, run, label. Runs that
    recorded a load average above the machine's 2 cores at their start are left off (their threads
    competed with other jobs; the tables still show them, with their notes)."""
    out = []
    for doc in docs:
        load = (doc.get("load_average_1_5_15min") or {}).get("start")
        if load and load[0] > 2.0:
            continue
        for r in doc["rows"]:
            tps = num(r.get("tokens_per_s"))
            if tps is None:
                continue
            method = str(r.get("method") or "")
            mb = num(r.get("file_mb")) or (num(r.get("onnx_bytes")) / 1e6 if num(r.get("onnx_bytes")) else None)
            if mb is None and "genai builder" in method and num(doc.get("genai_builder_onnx_bytes")):
                mb = doc["genai_builder_onnx_bytes"] / 1e6
            elif mb is None and method.startswith("onnxruntime") and num(doc.get("onnx_bytes")):
                mb = doc["onnx_bytes"] / 1e6
            if mb is None:
                continue
            engine = ("onnxruntime-genai, its own builder (peer)" if "genai builder" in method
                      else "onnxruntime-genai on llmc's export" if "genai" in method
                      else "ONNX Runtime, llmc OrtModel")
            out.append({"mb": mb, "tps": tps, "engine": engine, "run": doc["_file"], "label": decode_label(r, method)})
    return out


def coded_cache(r: dict) -> bool:
    """Whether a decode_shapes row's export has a cq_kv cache, which ppl-512x40 (each window from an empty cache)
    never reads: its ppl there is not the cache's."""
    return any(str(p).startswith("cq_kv") for p in r.get("passes") or [])


def plot_decode_pareto(docs: list[dict]) -> bytes:
    """decode_shapes rows that carry a ppl-512x40: decode tok/s against ONNX file bytes, one panel per batch size
    at 128-token prompts, each point labelled with its perplexity (× the FP32 export's)."""
    doc = next((d for d in docs if d["_file"] == "decode_shapes"), None)
    rows = [r for r in (doc["rows"] if doc else []) if num(r.get("ppl_512x40")) and r.get("prompt") == 128
            and num(r.get("onnx_bytes"))]
    name = lambda r: r["row"].rsplit("-b", 1)[0]  # noqa: E731  (decode_shapes.engine_of)
    fp = next((r["ppl_512x40"] for r in rows if name(r) == "fp32"), None)
    batches = sorted({r["batch"] for r in rows}) or [1]
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 5.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        labels = []
        for r in (r for r in rows if r["batch"] == batch):
            genai = "genai" in r["engine"]  # the runtime: "onnxruntime-genai" or "llmc OrtModel"
            mb, tps = r["onnx_bytes"] / 1e6, r["decode_tokens_per_s"]
            ax.scatter([mb], [tps], color=COLORS[1] if genai else COLORS[0], marker="*" if genai else "o",
                       s=110 if genai else 40, zorder=3)
            ratio = f" ({r['ppl_512x40'] / fp:.2f}× FP)" if fp else ""
            text = ("its windows never read the coded cache" if coded_cache(r)
                    else f"ppl {r['ppl_512x40']:.2f}{ratio}")
            labels.append((mb, tps, f"{name(r)}: {text}", "black"))
        place_labels(ax, labels, fontsize=7.5)
        ax.set_xscale("log")
        ax.set_xlabel("ONNX file MB (model.onnx + model.onnx.data)")
        ax.set_ylabel(f"decode tokens/s, batch {batch}, 128-token prompts")
        ax.set_title(f"batch {batch}: speed, bytes and ppl-512x40 (same run)", fontsize=10)
        ax.grid(True, lw=0.3, alpha=0.5)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([70, 100, 200, 300, 550])
        ax.set_xticklabels(["70", "100", "200", "300", "550"])
    fig.suptitle("SmolLM2-135M on a 2-core CPU: llmc exports (●) and onnxruntime-genai's builds (★)", fontsize=11)
    fig.tight_layout()
    return save_png(fig)


def plot_decode_vs_bytes(docs: list[dict]) -> bytes:
    from matplotlib.lines import Line2D

    pts = decode_points(docs)
    fig, ax = plt.subplots(figsize=(13, 7.5))
    fig.subplots_adjust(left=0.06, right=0.72, top=0.93, bottom=0.08)
    runs = sorted({p["run"] for p in pts})
    color = {r: COLORS[i % len(COLORS)] for i, r in enumerate(runs)}
    marker = {"ONNX Runtime, llmc OrtModel": "o", "onnxruntime-genai on llmc's export": "s",
              "onnxruntime-genai, its own builder (peer)": "*"}
    labels = []
    for p in pts:
        ax.scatter([p["mb"]], [p["tps"]], color=color[p["run"]], marker=marker[p["engine"]],
                   s=90 if marker[p["engine"]] == "*" else 30, zorder=3)
        labels.append((p["mb"], p["tps"], p["label"], color[p["run"]]))
    # BENCHMARKS.md: read bandwidth about 31.5 GB/s with 2 threads; a batch-1 step reads every weight once.
    xs = [10 ** (1.75 + i * 0.01) for i in range(110)]
    ax.plot(xs, [31.5e9 / (x * 1e6) for x in xs], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(65, 750)
    ax.set_ylim(0, 175)
    ticks = [70, 100, 150, 200, 300, 400, 550]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    place_labels(ax, labels, fontsize=6.8)
    ax.set_xlabel("ONNX file MB (model.onnx + model.onnx.data)")
    ax.set_ylabel("greedy decode tokens/s (batch 1, 128-token prompt + 128 new, median of 3)")
    ax.set_title("Decode speed vs model bytes, SmolLM2-135M on a 2-core CPU", fontsize=11)
    ax.grid(True, lw=0.3, alpha=0.5)
    h = [Line2D([], [], color=color[r], marker="o", lw=0) for r in runs]
    h += [Line2D([], [], color="black", marker=m, lw=0, markersize=9 if m == "*" else 6) for m in marker.values()]
    h.append(Line2D([], [], color="grey", lw=0.8, ls="--"))
    names = [f"run: {r}" for r in runs] + list(marker) + ["31.5 GB/s ÷ file bytes: the read-bandwidth\nbound of "
                                                          "BENCHMARKS.md (all weights read per token)"]
    ax.legend(h, names, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5, frameon=False)
    fig.text(0.735, 0.45, "Each point is a decode row of a results file that\nrecords the ONNX file it ran "
             "(docs/results.md).\nColours are runs: compare speeds within a run\nonly. The machine differed "
             "between runs, and\nstructured_ffn (not _layerwise_decode) ran\n1 ONNX Runtime thread.",
             fontsize=7.2, va="top")
    return save_png(fig)


# ----------------------------------------------------------------------------------------------
# Documents


def find_row(doc: dict, key: str) -> dict | None:
    for r in doc["rows"]:
        if r.get("row") == key:
            return r
    for r in doc["rows"]:
        if r.get("method") == key or str(r.get("method", "")).startswith(key):
            return r
    return None


def headline_value(r: dict) -> str | None:
    if is_quality(r):
        parts = [f"ppl {r['ppl']:.2f}"]
        if num(r.get("fp_ppl")) and r["ppl"] != r["fp_ppl"]:
            parts.append(f"{r['ppl'] / r['fp_ppl']:.2f}× FP")
        if num(r.get("bits_per_weight")):
            parts.append(f"{r['bits_per_weight']:.2f} bits/weight")
        elif bits_param(r) and bits_param(r) < 32:
            parts.append(f"{bits_param(r):.2f} bits/param")
        if num(r.get("bits_per_channel")):
            parts.append(f"{r['bits_per_channel']:.1f} bits/channel")
        if num(r.get("structured_fraction")) and num(r.get("ffn_fraction")):
            parts.append(f"factors {r['structured_fraction']:.0%} of the dense FFN "
                         f"({r['ffn_fraction']:.0%} stored after pre-merge)")
        return ", ".join(parts)
    if num(r.get("decode_tokens_per_s")) is not None:  # benchmarks/decode_shapes.py
        text = (f"decode {r['decode_tokens_per_s']:.1f} tok/s, prefill {r['prefill_tokens_per_s']:.0f} tok/s "
                f"(batch {r['batch']}, {r['prompt']}-token prompts), peak RSS {r['peak_rss_mb']:,} MB")
        return text + (f", ppl-512x40 {r['ppl_512x40']:.2f}" if num(r.get("ppl_512x40")) and not coded_cache(r) else "")
    if not is_speed(r):
        return None
    parts = [f"{r['tokens_per_s']:.1f} tok/s"]
    ratios = ratios_text(r)
    if ratios:
        parts.append(ratios.replace("; ", ", "))
    if num(r.get("file_mb")):
        parts.append(f"{r['file_mb']:.1f} MB")
    return ", ".join(parts)


def readme_block(docs: list[dict]) -> str:
    by_file = {d["_file"]: d for d in docs}
    rows = []
    for file, key, label in HEADLINES:
        doc = by_file.get(file)
        r = find_row(doc, key) if doc else None
        value = headline_value(r) if r else None
        if value is None:
            print(f"make_docs: headline {file}/{key} not found; left out of the README", file=sys.stderr)
            continue
        if file == "onnxruntime_decode_rtn4_all_int8" and num(doc.get("onnx_bytes")):
            value += f", {doc['onnx_bytes'] / 1e6:.1f} MB"
        if stale := stale_note(r, doc):
            value += f" ({stale})"
        rows.append([label, value, f"[{file}](docs/results.md#{file.lower()})"])
    return "\n".join(table(["result", "measured", "source"], rows))


def results_md(docs: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for d in docs:
        groups.setdefault(script_of(d), []).append(d)
    order = [g for g in ORDER if g in groups] + sorted(g for g in groups if g not in ORDER)
    lines = ["# Results", "",
             "<!-- generated by benchmarks/make_docs.py from benchmarks/results/*.json; do not edit -->", "",
             "Every measured row of `benchmarks/results/`, grouped by the script that wrote it, with the command, "
             "commit, date and machine of each run (a row measured in another run of the same file carries its "
             "own commit). Model: SmolLM2-135M-Instruct dequantized to float32 (\"FP\"); protocols and peers "
             "are those of `../shared/BENCHMARKS.md`. Regenerate with `.venv/bin/python benchmarks/make_docs.py`.",
             "", "## Plots", "",
             "![perplexity vs bits per parameter](plots/ppl_vs_bits.png)", "",
             "Every weight-quantization row (perplexity ÷ FP perplexity against the stored bits per parameter of "
             "the decoder linears) beside the peers measured in BENCHMARKS.md (★, ppl-512x5). "
             "Discussed in [pv_quant](passes/pv_quant.md) and [rtn_quant](passes/rtn_quant.md).", "",
             "![perplexity vs KV bits per channel](plots/ppl_vs_kv_bits.png)", "",
             "Every KV-cache row, per protocol; lines join one configuration across bit widths. "
             "Discussed in [cq_kv](passes/cq_kv.md) and [uniform_kv](passes/uniform_kv.md).", "",
             "![decode tokens/s vs model bytes](plots/decode_vs_bytes.png)", "",
             "Every decode row that records the ONNX file it ran; colours are runs, and speeds compare within a "
             "run. Discussed in [the ONNX Runtime backend](backends/onnxruntime.md).", "",
             "![decode tokens/s vs bytes vs perplexity](plots/decode_pareto.png)", "",
             "The decode_shapes rows that carry a perplexity: llmc's exports and onnxruntime-genai's builds, timed "
             "in one run and scored on ppl-512x40. Discussed in [the ONNX Runtime backend](backends/onnxruntime.md).",
             "", "## Contents", ""]
    for g in order:
        lines.append(f"- [{g} benchmark](#{g.lower()}-benchmark): " + ", ".join(f"[{d['_file']}](#{d['_file'].lower()})"
                                                            for d in groups[g]))
    lines.append("")
    for g in order:
        page = PAGES.get(g)
        lines += [f"## {g} benchmark", ""]
        if page:
            lines += [f"Discussed in [{page}]({page}).", ""]
        for d in groups[g]:
            lines += doc_section(d)
    return "\n".join(lines).rstrip() + "\n"


def outputs() -> dict[str, bytes]:
    docs = load_results()
    peer = peers()
    out = {os.path.join(DOCS, "results.md"): results_md(docs).encode(),
           os.path.join(PLOTS, "ppl_vs_bits.png"): plot_ppl_vs_bits(docs, peer),
           os.path.join(PLOTS, "ppl_vs_kv_bits.png"): plot_ppl_vs_kv_bits(docs, peer),
           os.path.join(PLOTS, "decode_vs_bytes.png"): plot_decode_vs_bytes(docs),
           os.path.join(PLOTS, "decode_pareto.png"): plot_decode_pareto(docs)}
    if os.path.exists(README):
        text = open(README, encoding="utf-8").read()
        if BEGIN in text and END in text:
            start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
            out[README] = (text[:start] + "\n" + readme_block(docs) + "\n" + text[end:]).encode()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date; write nothing")
    args = ap.parse_args(argv)
    plt.rcParams.update({"font.family": "DejaVu Sans", "svg.hashsalt": "llmc", "path.simplify": True})
    stale = []
    for path, content in outputs().items():
        old = open(path, "rb").read() if os.path.exists(path) else None
        if old == content:
            continue
        stale.append(os.path.relpath(path, ROOT))
        if not args.check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
    verb = "out of date" if args.check else "written"
    print(f"make_docs: {len(stale)} file(s) {verb}" + (": " + ", ".join(stale) if stale else ""))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
