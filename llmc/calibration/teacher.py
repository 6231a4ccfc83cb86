"""The distillation teacher of a graph, and the KL divergence a student is trained to close."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn.functional as F
from torch import fx

from llmc.calibration.blocks import decode_inputs


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher) ‖ softmax(student)), in nats."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def graph_teacher(gm: fx.GraphModule, empty_cache):
    """`(input_ids, attention_mask) -> logits` of a frozen copy of the graph as it is now (the
    distillation teacher of a pass that rewrites it next, when the context brings none).

    Shares the weights: tensors the pass replaces afterwards keep their old values here, but one
    modified in place would change the teacher too. `empty_cache(batch)` gives an empty cache.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        frozen = fx.GraphModule(gm, copy.deepcopy(gm.graph))

    def teacher(ids, mask=None):
        _, pos = decode_inputs(ids)
        mask = torch.ones_like(ids) if mask is None else mask
        return frozen(ids, mask, pos, empty_cache(ids.shape[0]))[0]

    return teacher


def native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 matmuls natively on this CPU (AVX-512 / AMX); on AVX2 they are emulated
    and measured 7x slower than float32, so autocast would only cost time."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def autocast(enabled: bool):
    """bfloat16 autocast on CPU where `enabled`, else a no-op context."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
