"""Build the guide pair of the weak-to-strong demonstration (docs/passes/fuse_guidance.md).

    .venv/bin/python scripts/make_guides.py -o out/guides          # ~10 min on 1 CPU thread

untuned: a shallow student of SmolLM2-135M-Instruct (its embedding, final norm and head, plus a
few of its 30 decoder layers, evenly spaced), briefly distilled from the full model (KL to the
teacher's next-token distribution) on the first tokens of wikitext-2/valid.txt.
tuned: the student further trained by DPO (Rafailov et al.) on pairs of its own samples: for
each prompt it writes `samples` continuations, VADER's compound score (the gold reward of the
demonstration) ranks them, and the best and the worst form a preference pair when their scores
differ by at least `min_margin` (the IMDB recipe of Zhou et al.: synthetic preferences from the
gold reward). The DPO reference is the untuned student.
Prompts are sentence starts from wikitext-2/valid.txt (the benchmark's prompts come from the test
split). Both models are written as Hugging Face folders that `llmc.compile` reads, with a
`guides.json` that records every setting, loss and time. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F



def make_student(teacher, layers: list[int]):
    """A copy of `teacher` keeping only decoder `layers` (same embedding, norm and head)."""
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = type(teacher)(cfg)
    state = {}
    for k, v in teacher.state_dict().items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", k)
        if m:
            i = int(m.group(1))
            if i in layers:
                state[f"model.layers.{layers.index(i)}.{m.group(2)}"] = v.clone()
        else:
            state[k] = v.clone()
    student.load_state_dict(state, strict=False)
    student.tie_weights()
    return student.float().eval()


def trainable(model) -> list:
    """Decoder layers and the final norm; the (tied) embedding / head stays the teacher's."""
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("model.layers.") or name.startswith("model.norm."))
        if p.requires_grad:
            params.append(p)
    return params


def distill(student, teacher, ids: torch.Tensor, steps: int, batch: int, lr: float, seed: int, log) -> list[float]:
    """KL(teacher || student) over every position of windows `ids` [N, T], `steps` AdamW steps."""
    opt = torch.optim.AdamW(trainable(student), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    student.train()
    for step in range(steps):
        rows = torch.randint(0, ids.shape[0], (batch,), generator=gen)
        x = ids[rows]
        with torch.no_grad():
            t_logp = teacher(input_ids=x).logits.float().log_softmax(-1)
        s_logp = student(input_ids=x).logits.float().log_softmax(-1)
        loss = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 10))
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            log(f"distill step {step + 1}/{steps}: KL {loss.item():.3f}")
    student.eval()
    return losses


def response_logps(model, prompt_ids: list[list[int]], resp_ids: list[list[int]], pad: int) -> torch.Tensor:
    """Σ log π(response | prompt) per row (right-padded batch, gradients kept)."""
    rows = [p + r for p, r in zip(prompt_ids, resp_ids)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros(len(rows), width, dtype=torch.long)
    lab = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, resp_ids)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        att[i, :len(p) + len(r)] = 1
        lab[i, len(p):len(p) + len(r)] = True
    logp = model(input_ids=ids, attention_mask=att).logits.float().log_softmax(-1)
    tok = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return (tok * lab[:, 1:]).sum(1)


def dpo(policy, reference, pairs: list, epochs: int, batch: int, lr: float, beta: float, pad: int, seed: int,
        log) -> list[float]:
    """DPO: −log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]) over (prompt, chosen, rejected)."""
    with torch.no_grad():
        ref_c = torch.cat([response_logps(reference, [p for p, _, _ in pairs[i:i + batch]],
                                          [c for _, c, _ in pairs[i:i + batch]], pad) for i in range(0, len(pairs), batch)])
        ref_r = torch.cat([response_logps(reference, [p for p, _, _ in pairs[i:i + batch]],
                                          [r for _, _, r in pairs[i:i + batch]], pad) for i in range(0, len(pairs), batch)])
    opt = torch.optim.AdamW(trainable(policy), lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    policy.train()
    total = epochs * math.ceil(len(pairs) / batch)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            p = [pairs[j][0] for j in idx]
            lc = response_logps(policy, p, [pairs[j][1] for j in idx], pad)
            lr_ = response_logps(policy, p, [pairs[j][2] for j in idx], pad)
            margin = beta * ((lc - ref_c[idx]) - (lr_ - ref_r[idx]))
            loss = -F.logsigmoid(margin).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            for g in opt.param_groups:  # linear warmup over the first quarter, as the reference's recipe
                g["lr"] = lr * min(1.0, (step + 1) / max(1, total // 4))
            opt.step()
            step += 1
            losses.append(loss.item())
        log(f"dpo epoch {epoch + 1}/{epochs}: loss {sum(losses[-math.ceil(len(pairs) / batch):]) / math.ceil(len(pairs) / batch):.4f}")
    policy.eval()
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="out/guides", help="output folder (untuned/, tuned/, guides.json)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the student (of 30)")
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--distill-len", type=int, default=128)
    ap.add_argument("--distill-lr", type=float, default=5e-4)
    ap.add_argument("--prompts", type=int, default=320, help="DPO prompts (wikitext-2 valid sentence starts)")
    ap.add_argument("--prompt-words", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4, help="student samples per prompt")
    ap.add_argument("--response-tokens", type=int, default=20)
    ap.add_argument("--min-margin", type=float, default=0.2, help="least VADER gap between chosen and rejected")
    ap.add_argument("--dpo-epochs", type=int, default=3)
    ap.add_argument("--dpo-batch", type=int, default=16)
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    import llmc
    from llmc import data
    from llmc.data import sentence_starts

    def log(msg):
        print(f"make_guides: {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    src = llmc.load_model("smollm2-135m")
    teacher, tok = src.model.float().eval(), src.tokenizer
    n = teacher.config.num_hidden_layers
    layers = sorted({round(i * (n - 1) / (args.layers - 1)) for i in range(args.layers)}) if args.layers > 1 else [0]
    student = make_student(teacher, layers)
    log(f"student: layers {layers} of {n}, {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M parameters")

    valid = data.text("wikitext2-valid")
    ids = data.tokenize(tok, valid)
    T = args.distill_len
    windows = ids[: (ids.numel() // T) * T].view(-1, T)[:512]  # the first 512 windows (65k tokens) of valid
    t1 = time.perf_counter()
    distill_losses = distill(student, teacher, windows, args.distill_steps, args.distill_batch, args.distill_lr,
                             args.seed, log)
    distill_s = time.perf_counter() - t1

    # DPO data: the student's own samples, ranked by VADER.
    prompts = sentence_starts(valid, args.prompt_words, args.prompts)
    vader = SentimentIntensityAnalyzer()
    t2 = time.perf_counter()
    untuned = llmc.compile(student, tokenizer=tok, progress=False)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    pairs, gaps, rewards_before = [], [], []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        batch = [p for p in chunk for _ in range(args.samples)]
        outs = untuned.generate(batch, args.response_tokens, do_sample=True, temperature=0.7, top_k=50,
                                seed=args.seed + i, return_tokens=True)
        for j, p in enumerate(chunk):
            cands = outs[j * args.samples:(j + 1) * args.samples]
            scores = [vader.polarity_scores(tok.decode(c, skip_special_tokens=True))["compound"] for c in cands]
            rewards_before.extend(scores)
            best, worst = max(range(len(cands)), key=scores.__getitem__), min(range(len(cands)), key=scores.__getitem__)
            if scores[best] - scores[worst] >= args.min_margin and cands[best] and cands[worst]:
                pairs.append((tok.encode(p), cands[best], cands[worst]))
                gaps.append(scores[best] - scores[worst])
    sample_s = time.perf_counter() - t2
    log(f"{len(pairs)} preference pairs from {len(prompts)} prompts (mean VADER gap {sum(gaps) / max(1, len(gaps)):.3f})")

    reference = copy.deepcopy(student).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    tuned = copy.deepcopy(student)
    t3 = time.perf_counter()
    dpo_losses = dpo(tuned, reference, pairs, args.dpo_epochs, args.dpo_batch, args.dpo_lr, args.dpo_beta, pad,
                     args.seed, log)
    dpo_s = time.perf_counter() - t3

    os.makedirs(args.out, exist_ok=True)
    for name, model in (("untuned", student), ("tuned", tuned)):
        folder = os.path.join(args.out, name)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    report = {
        "command": " ".join(["python", "scripts/make_guides.py", *(argv if argv is not None else sys.argv[1:])]),
        "teacher": "smollm2-135m", "student_layers": layers,
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "settings": vars(args), "distill_data": f"wikitext-2/valid.txt, first {windows.shape[0]} windows of {T} tokens",
        "distill_kl_first": distill_losses[0], "distill_kl_last10": sum(distill_losses[-10:]) / min(10, len(distill_losses)),
        "dpo_prompts": len(prompts), "dpo_pairs": len(pairs), "dpo_mean_vader_gap": sum(gaps) / max(1, len(gaps)),
        "student_sample_vader_mean": sum(rewards_before) / max(1, len(rewards_before)),
        "dpo_loss_first_epoch": sum(dpo_losses[:math.ceil(len(pairs) / args.dpo_batch)]) / math.ceil(len(pairs) / args.dpo_batch),
        "dpo_loss_last_epoch": sum(dpo_losses[-math.ceil(len(pairs) / args.dpo_batch):]) / math.ceil(len(pairs) / args.dpo_batch),
        "seconds": {"distill": round(distill_s, 1), "sampling": round(sample_s, 1), "dpo": round(dpo_s, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "threads": args.threads,
    }
    with open(os.path.join(args.out, "guides.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(f"wrote {args.out} in {report['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
