"""Fused lowering: rewrite an exported decoder into ONNX Runtime's fused contrib ops.

`fuse(model_path, max_positions)` loads `model.onnx` (with its external data) into onnx_ir,
applies the rewrites below in order, saves it in place and returns how many times each fired:

    SimplifiedLayerNormalization       RMSNorm (x * rsqrt(mean(x²) + eps) * w) as one op; onnxscript's
                                       ort_fusions rule, which matches the exporter's Pow / ReduceMean /
                                       Add / Sqrt / Reciprocal / Mul / Mul chain, and llmc's rule for a
                                       norm whose gain fold_norm_scales removed (a scale of ones)
    SkipSimplifiedLayerNormalization   a residual Add feeding such a norm, as one op that also returns the
                                       sum (onnxscript's rule; the norm that reads the embeddings stays
                                       a SimplifiedLayerNormalization)
    RotaryEmbedding                    llmc's traced rotation of q and k, x·cos + roll(x, d/2)·sin± with
                                       cos/sin computed from `position_ids` and a constant inv_freq, as
                                       com.microsoft.RotaryEmbedding over constant cos/sin caches of
                                       `max_positions` rows (llmc's own rule, `LlmcRotaryFusion`)
    MatMulNBitsMerge                   MatMulNBits layers that read the same input with the same K,
                                       bits, block size and accuracy level (q/k/v, gate/up) as one
                                       MatMulNBits over their codes, scales and zero points
                                       concatenated along N, then a Split (`merge_matmulnbits`);
                                       `MatMulNBitsMerge.linears` counts the layers merged
    BinaryBasesLinearMerge             the same for llmc.BinaryBasesLinear (qbb_quant with the kernel
                                       lowering): signs, scales and kept outliers concatenated along N
                                       (`merge_binary_bases`)
    RotaryInAttention                  the RotaryEmbeddings of q and k moved into the GroupQueryAttention
                                       that reads them (its do_rotary, over the same cos/sin caches): it
                                       rotates at each token's index in the cache buffer, which for a
                                       left-padded row is its position plus the row's padding; the scores,
                                       and so the logits, are the same up to float rounding (see the rule)
    BiasBeforeSplit                    constant biases added to every part of a merge's Split (q/k/v with
                                       biases) added, concatenated, before it (`biases_before_split`)
    RotaryTables                       the RoPE tables still computed as tensors (cos or sin of the
                                       positions times inv_freq: the cached keys' tables of a code cache
                                       and the query's that its attention op rotates with) gathered from
                                       constant tables of max_positions rows instead
    RotarySignedSin                    the signed sin built from such gathered rows (rotate_half's
                                       cat(-sin[:d/2], sin[d/2:])) gathered from a signed table instead
    PackedQKV                          a GroupQueryAttention whose q, k and v are the parts of one Split
                                       (a merged q/k/v projection) reads the merged tensor unsplit; so
                                       does an llmc.CQCachedAttention that rotates q itself (`PackedCQ`)

Last, the norms' optional outputs that nothing reads are left out (`drop_unused_statistics`).

A rewrite only fires where its whole pattern matches, with the constants it needs (epsilon,
inv_freq, packed weights) known: LayerNorm (with a mean and a bias), a rotation whose cos/sin are
scaled or not computed from a constant inv_freq, 3-bit codes widened at load, or MatMulNBits layers
of different layouts are left as exported. Partial rotary (GPT-NeoX, StableLM) is rewritten on the
rotated slice of each head. Every rewrite keeps the arithmetic up to float rounding order (the
merged MatMulNBits rounds each int8 block of its input as each layer did), and `lower` checks the
fused folder against torch as it checks any.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np

FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding")


def _const(value) -> np.ndarray | None:
    """The constant behind an ir.Value (initializer or folded Constant), as numpy; None if not constant."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _is(value, *expected) -> bool:
    """Whether `value` is a constant equal to one of `expected` (each a list of ints)."""
    arr = _const(value)
    return arr is not None and any(arr.reshape(-1).tolist() == list(e) for e in expected)


def _angles(op, inv_freq, max_positions: int):
    """Constant nodes of the RoPE angles [max_positions, d/2]: float32 positions x inv_freq, the float32 product torch
    takes. Every input is a constant, so ONNX Runtime folds them (and the cos/sin of them) when it loads the session,
    and the file holds no more than inv_freq."""
    positions = op.Range(op.Constant(value_float=0.0), op.Constant(value_float=float(max_positions)),
                         op.Constant(value_float=1.0))
    return op.Mul(op.Unsqueeze(positions, op.Constant(value_ints=[1])),
                  op.Reshape(inv_freq, op.Constant(value_ints=[1, -1])))


def _rotary_rule_class():
    from onnxscript.rewriter import pattern

    class LlmcRotaryFusion(pattern.RewriteRuleClassBase):
        """llmc's traced RoPE of one q or k tensor [B, heads, S, d] -> com.microsoft.RotaryEmbedding.

        The tracer writes rotate_half(x)·sin as roll(x, d/2)·sin± with sin± = cat(-sin[:d/2], sin[d/2:]);
        cos and sin come from emb = cat(f, f), f = float(position_ids[..., None]) · inv_freq. The rewrite
        reads position_ids directly and gathers cos/sin rows from caches [max_positions, d/2] of the same
        float32 angles, computed by constant nodes (shared by every layer with the same inv_freq). The
        cos/sin nodes of the trace are shared between layers, so matched nodes are left for dead-code
        removal.
        """

        def __init__(self, max_positions: int):
            super().__init__("RotaryEmbedding", remove_nodes=False)
            self.max_positions = max_positions
            self._caches: dict = {}

        def pattern(self, op, x, position_ids, pos_axis, inv_freq, cos_axis, sin_axis, s_lo0, s_lo1, s_lo_ax,
                    s_hi0, s_hi1, s_hi_ax, x_hi0, x_hi1, x_hi_ax, x_lo0, x_lo1, x_lo_ax):
            from onnx_ir import DataType

            freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, pos_axis), to=DataType.FLOAT), inv_freq)
            emb = op.Concat(freqs, freqs, axis=-1)
            sin = op.Sin(emb)

            def half(v, start, end, axis, name):  # a Slice, with or without its steps input
                return op.Slice(v, start, end, axis, _allow_other_inputs=True, _outputs=[name])

            signed = op.Concat(op.Neg(half(sin, s_lo0, s_lo1, s_lo_ax, "sin_lo")),
                               half(sin, s_hi0, s_hi1, s_hi_ax, "sin_hi"), axis=-1)
            rolled = op.Concat(half(x, x_hi0, x_hi1, x_hi_ax, "x_hi"), half(x, x_lo0, x_lo1, x_lo_ax, "x_lo"), axis=3)
            return op.Add(op.Mul(x, op.Unsqueeze(op.Cos(emb), cos_axis)),
                          op.Mul(rolled, op.Unsqueeze(signed, sin_axis)))

        def check(self, op, x, position_ids, pos_axis, inv_freq, cos_axis, sin_axis, s_lo0, s_lo1, s_lo_ax,
                  s_hi0, s_hi1, s_hi_ax, x_hi0, x_hi1, x_hi_ax, x_lo0, x_lo1, x_lo_ax, sin_lo, sin_hi, x_hi, x_lo,
                  **_):
            result = pattern.MatchResult()
            slices = (sin_lo, sin_hi, x_hi, x_lo)
            shape = x.shape
            if shape is None or shape.rank() != 4 or not all(isinstance(shape[i], int) for i in (1, 3)):
                return result.fail("x is not [batch, heads, seq, head_dim] with static heads and head_dim", x)
            d = shape[3]
            freq = _const(inv_freq)
            if freq is None or freq.size * 2 != d or freq.dtype != np.float32:
                return result.fail("inv_freq is not a float32 constant of head_dim / 2 values (partial rotary?)",
                                   inv_freq)
            if position_ids.shape is None or position_ids.shape.rank() != 2:
                return result.fail("position_ids is not [batch, seq]", position_ids)
            # a Slice to the end is written with INT64_MAX
            ends = lambda v: (a := _const(v)) is not None and a.size == 1 and int(a.reshape(-1)[0]) >= d  # noqa: E731
            checks = [
                _is(pos_axis, [-1], [2]), _is(cos_axis, [1]), _is(sin_axis, [1]),
                _is(s_lo0, [0]), _is(s_lo1, [d // 2]), _is(s_lo_ax, [-1], [2]),
                _is(s_hi0, [d // 2]), ends(s_hi1), _is(s_hi_ax, [-1], [2]),
                _is(x_hi0, [d // 2]), ends(x_hi1), _is(x_hi_ax, [-1], [3]),
                _is(x_lo0, [0]), _is(x_lo1, [d // 2]), _is(x_lo_ax, [-1], [3]),
            ]
            steps = [v.producer().inputs[4] for v in slices if len(v.producer().inputs) > 4]
            if not all(checks) or not all(_is(v, [1]) for v in steps):
                return result.fail("the slices are not the halves of the head (or of cos/sin)")
            return result

        def rewrite(self, op, x, position_ids, inv_freq, **_):
            import onnx_ir as ir

            key = inv_freq.name
            if key not in self._caches:
                angles = _angles(op, inv_freq, self.max_positions)
                self._caches[key] = (op.Cos(angles), op.Sin(angles))
                for cache in self._caches[key]:  # known shapes, which RotaryInAttention checks
                    cache.shape, cache.type = ir.Shape([self.max_positions, x.shape[3] // 2]), x.type
            cos, sin = self._caches[key]
            return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, num_heads=x.shape[1],
                                      _domain="com.microsoft")

    return LlmcRotaryFusion


def _rotary_tables_rule_class():
    from onnxscript.rewriter import pattern

    class RotaryTables(pattern.RewriteRuleClassBase):
        """Cos (or Sin) of cat(f, f), f = float(positions[..., None]) · inv_freq, for int positions [B, T] ->
        Gather of rows of a table [max_positions, d] of the same float32 angles, computed by constant nodes (ONNX
        Runtime folds them at load; shared by the tables of one inv_freq). Takes the RoPE tables that are left
        as tensors after LlmcRotaryFusion: the cached keys' tables of a code cache (cq_kv recomputes them for
        every key in the cache each step, B·T·d cosines and sines) and the query's tables its attention op
        reads."""

        def __init__(self, function: str, max_positions: int, caches: dict):
            super().__init__(f"RotaryTables{function}", remove_nodes=False)  # cos and sin share their angles
            self.function, self.max_positions, self._caches = function, max_positions, caches

        def pattern(self, op, positions, pos_axis, inv_freq):
            from onnx_ir import DataType

            freqs = op.Mul(op.Cast(op.Unsqueeze(positions, pos_axis), to=DataType.FLOAT), inv_freq)
            return getattr(op, self.function)(op.Concat(freqs, freqs, axis=-1))

        def check(self, op, positions, pos_axis, inv_freq, **_):
            from onnx_ir import DataType

            result = pattern.MatchResult()
            freq = _const(inv_freq)
            if freq is None or freq.dtype != np.float32 or freq.ndim != 1:
                return result.fail("inv_freq is not a float32 constant vector", inv_freq)
            if positions.shape is None or positions.shape.rank() != 2 or positions.dtype != DataType.INT64:
                return result.fail("the positions are not int64 [batch, seq]", positions)
            if not _is(pos_axis, [-1], [2]):
                return result.fail("not positions[..., None]", pos_axis)
            return result

        def rewrite(self, op, positions, inv_freq, **_):
            import onnx_ir as ir

            key = (inv_freq.name, self.function)
            if key not in self._caches:
                angles = _angles(op, inv_freq, self.max_positions)
                table = getattr(op, self.function)(op.Concat(angles, angles, axis=-1))
                table.shape, table.type = ir.Shape([self.max_positions, 2 * _const(inv_freq).size]), \
                    ir.TensorType(ir.DataType.FLOAT)
                self._caches[key] = table
            return op.Gather(self._caches[key], positions, axis=0)

    return RotaryTables


def _signed_sin_rule_class():
    from onnxscript.rewriter import pattern

    class RotarySignedSin(pattern.RewriteRuleClassBase):
        """cat(-rows[..., :d/2], rows[..., d/2:]) of the rows a RotaryTables Gather took from a sin table (the
        traced rotate_half's signed sin, over every cached key each step at a code cache) -> the same Gather
        from the signed table, computed by constant nodes from the sin table (folded at load). The same
        values: a negation and a copy."""

        def __init__(self, caches: dict):
            super().__init__("RotarySignedSin", remove_nodes=False)  # the sin rows may have other readers
            self._caches, self._signed = caches, {}

        def pattern(self, op, table, positions, lo0, lo1, lo_ax, hi0, hi1, hi_ax):
            rows = op.Gather(table, positions, axis=0)
            return op.Concat(op.Neg(op.Slice(rows, lo0, lo1, lo_ax, _allow_other_inputs=True, _outputs=["lo"])),
                             op.Slice(rows, hi0, hi1, hi_ax, _allow_other_inputs=True, _outputs=["hi"]), axis=-1)

        def check(self, op, table, positions, lo0, lo1, lo_ax, hi0, hi1, hi_ax, lo, hi, **_):
            result = pattern.MatchResult()
            if not any(table is v for (_, function), v in self._caches.items() if function == "Sin"):
                return result.fail("not a sin table of RotaryTables", table)
            d = table.shape[1]
            rank = 1 + positions.shape.rank() if positions.shape is not None else None
            ends = (a := _const(hi1)) is not None and a.size == 1 and int(a.reshape(-1)[0]) >= d
            steps = [v.producer().inputs[4] for v in (lo, hi) if len(v.producer().inputs) > 4]
            if rank is None or not (_is(lo0, [0]) and _is(lo1, [d // 2]) and _is(hi0, [d // 2]) and ends
                                    and _is(lo_ax, [-1], [rank - 1]) and _is(hi_ax, [-1], [rank - 1])
                                    and all(_is(v, [1]) for v in steps)):
                return result.fail("the slices are not the two halves of the last axis")
            return result

        def rewrite(self, op, table, positions, **_):
            import onnx_ir as ir

            if table.name not in self._signed:
                d = table.shape[1]
                half = lambda start, end: op.Slice(table, op.Constant(value_ints=[start]),  # noqa: E731
                                                   op.Constant(value_ints=[end]), op.Constant(value_ints=[1]))
                signed = op.Concat(op.Neg(half(0, d // 2)), half(d // 2, d), axis=1)
                signed.shape, signed.type = ir.Shape(table.shape), table.type
                self._signed[table.name] = signed
            return op.Gather(self._signed[table.name], positions, axis=0)

    return RotarySignedSin


def _unit_rms_rule_class():
    from onnxscript.rewriter import pattern

    class UnitRmsNormFusion(pattern.RewriteRuleClassBase):
        """RMSNorm without a gain (fold_norm_scales moved it into the next linears): x * rsqrt(mean(x²) + eps)
        -> SimplifiedLayerNormalization with a scale of ones. Runs after onnxscript's rule, which takes the
        norms that do have a gain."""

        def __init__(self):
            super().__init__("UnitRmsNorm")
            self._ones: dict = {}  # one scale initializer per width, shared by the norms

        def pattern(self, op, x, two, axes, epsilon):
            mean = op.ReduceMean(op.Pow(x, two), axes, keepdims=1, noop_with_empty_axes=0)
            return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean, epsilon))))

        def check(self, op, x, two, axes, epsilon, **_):
            result = pattern.MatchResult()
            eps = _const(epsilon)
            if not (_is(axes, [-1]) and _const(two) is not None and _const(two).reshape(-1).tolist() == [2.0]):
                return result.fail("not a mean of squares over the last axis")
            if eps is None or eps.size != 1 or eps.dtype != np.float32 or x.dtype is None or x.dtype.name != "FLOAT":
                return result.fail("not a float32 norm with a constant epsilon", epsilon)
            if x.shape is None or not isinstance(x.shape[-1], int):
                return result.fail("the normalized dimension is not static", x)
            return result

        def rewrite(self, op, x, epsilon, **_):
            import onnx_ir as ir

            d = x.shape[-1]
            if d not in self._ones:
                ones = ir.tensor(np.ones(d, dtype=np.float32), name=f"llmc_unit_norm_scale_{d}")
                self._ones[d] = op.initializer(ones)
            eps = float(_const(epsilon).reshape(-1)[0])
            return op.SimplifiedLayerNormalization(x, self._ones[d], axis=-1, epsilon=eps, stash_type=1)

    return UnitRmsNormFusion


def _same_shape(a, b) -> bool:
    """Whether two ir.Values have the same known shape (symbolic dims compared by name)."""
    return a.shape is not None and b.shape is not None and a.shape.rank() == b.shape.rank() and \
        all(str(x) == str(y) for x, y in zip(a.shape, b.shape))


def _heads_rule_classes():
    """Rules that take the attention inputs of GroupQueryAttention ([B, S, heads*D]) straight from the
    projections: the traced graph splits each projection into heads [B, heads, S, D] (Reshape, Transpose) and
    the GroupQueryAttention lowering joins them back (Transpose, Reshape)."""
    from onnxscript.rewriter import pattern

    class HeadsRoundTrip(pattern.RewriteRuleClassBase):
        """Reshape(Reshape(x, [B, S, heads, D]), [0, 0, -1]) -> x (the values: their transposes cancel at export)."""

        def pattern(self, op, x, heads, flat):
            return op.Reshape(op.Reshape(x, heads, _allow_other_attributes=True), flat, _allow_other_attributes=True,
                              _outputs=["out"])

        def check(self, op, x, heads, flat, out, **_):
            result = pattern.MatchResult()
            if not _is(flat, [0, 0, -1]) or not _same_shape(x, out) or x.shape.rank() != 3:
                return result.fail("not a split of the last dim into heads and back", flat)
            return result

        def rewrite(self, op, x, **_):
            return op.Identity(x)

    class RotaryOnHidden(pattern.RewriteRuleClassBase):
        """The same round trip around a RotaryEmbedding of the heads: RotaryEmbedding of x [B, S, heads*D] itself
        (ONNX Runtime's op takes either layout)."""

        def pattern(self, op, x, heads, position_ids, cos, sin, flat):
            split = op.Transpose(op.Reshape(x, heads, _allow_other_attributes=True), perm=[0, 2, 1, 3])
            rotated = op.RotaryEmbedding(split, position_ids, cos, sin, _domain="com.microsoft",
                                         _allow_other_attributes=True, _outputs=["rotated"])
            return op.Reshape(op.Transpose(rotated, perm=[0, 2, 1, 3]), flat, _allow_other_attributes=True,
                              _outputs=["out"])

        def check(self, op, x, flat, rotated, out, **_):
            result = pattern.MatchResult()
            attrs = rotated.producer().attributes
            if not _is(flat, [0, 0, -1]) or not _same_shape(x, out) or x.shape.rank() != 3:
                return result.fail("not a split of the last dim into heads and back", flat)
            if attrs.get_int("interleaved", 0) or attrs.get_int("rotary_embedding_dim", 0):
                return result.fail("an interleaved or partial rotation", rotated)
            return result

        def rewrite(self, op, x, position_ids, cos, sin, rotated, **_):
            heads = rotated.producer().attributes.get_int("num_heads")
            return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, num_heads=heads,
                                      _domain="com.microsoft")

    return HeadsRoundTrip, RotaryOnHidden


def _attention_rule_classes():
    """Rules that hand GroupQueryAttention the work of the nodes before it: the rotation of q and k (its
    `do_rotary`) and the split of a merged q/k/v projection (its packed query input)."""
    from onnxscript.rewriter import pattern

    def gqa(op, q, k, v, past_key, past_value, seqlens, total, cos, sin, bias):
        return op.GroupQueryAttention(q, k, v, past_key, past_value, seqlens, total, cos, sin, None, bias,
                                      _domain="com.microsoft", _allow_other_attributes=True, _outputs=["out", "pk", "pv"])

    def split_on_last_axis(q) -> bool:
        """Whether q, a Split's first output, is [batch, seq, hidden] split on its last axis."""
        return q.shape is not None and q.shape.rank() == 3 and q.producer().attributes.get_int("axis", 0) in (-1, 2)

    def rewritten(op, out, inputs, **attributes):
        """A GroupQueryAttention with the attributes of the matched one (`out`'s producer), and `attributes`."""
        attrs = {a.name: a.value for a in out.producer().attributes.values()}
        return op.GroupQueryAttention(*inputs, _domain="com.microsoft", _outputs=3, **{**attrs, **attributes})

    class RotaryInAttention(pattern.RewriteRuleClassBase):
        """GroupQueryAttention(RotaryEmbedding(q), RotaryEmbedding(k), v, ...) -> GroupQueryAttention(q, k, v, ...,
        cos, sin, do_rotary=1).

        The op rotates each step's token at its index in the cache buffer (seqlens_k + 1 - S + s), not at
        `position_ids`: the same position for an unpadded row, and for a left-padded row its position plus
        the row's padding. A rotation's scores depend only on the distance between the query's and the key's
        positions, which the shift keeps, so the logits are those of `position_ids` up to float rounding,
        wherever the positions count real tokens from the row's first (llmc.generation.position_ids_from_mask,
        which every llmc runtime uses). The keys in the cache of a padded row are rotated by the shifted
        positions. Taken only where the rotations are full (no partial rotary), not interleaved, read the
        graph's own position_ids input and one pair of cos/sin caches of head_dim / 2 columns."""

        def __init__(self):
            super().__init__("RotaryInAttention")

        def pattern(self, op, q, k, v, past_key, past_value, seqlens, total, position_ids, cos, sin, bias):
            rotate = lambda x, name: op.RotaryEmbedding(x, position_ids, cos, sin, _domain="com.microsoft",  # noqa: E731
                                                        _allow_other_attributes=True, _outputs=[name])
            return gqa(op, rotate(q, "rq"), rotate(k, "rk"), v, past_key, past_value, seqlens, total, None, None, bias)

        def check(self, op, q, position_ids, cos, out, rq, rk, **_):
            result = pattern.MatchResult()
            if not position_ids.is_graph_input():
                return result.fail("the rotation's positions are not the graph's position_ids", position_ids)
            for rotated in (rq, rk):
                attrs = rotated.producer().attributes
                if attrs.get_int("interleaved", 0) or attrs.get_int("rotary_embedding_dim", 0) \
                        or attrs.get_float("scale", 1.0) != 1.0:
                    return result.fail("an interleaved, partial or scaled rotation", rotated)
            heads = out.producer().attributes.get_int("num_heads")
            width = q.shape[-1] if q.shape is not None and q.shape.rank() == 3 else None
            half = cos.shape[-1] if cos.shape is not None and cos.shape.rank() == 2 else None
            if not (isinstance(width, int) and isinstance(half, int) and width == heads * 2 * half):
                return result.fail("q is not [batch, seq, heads * head_dim] with cos/sin of head_dim / 2 columns", q)
            return result

        def rewrite(self, op, q, k, v, past_key, past_value, seqlens, total, cos, sin, bias, out, **_):
            return rewritten(op, out, [q, k, v, past_key, past_value, seqlens, total, cos, sin, None, bias],
                             do_rotary=1, rotary_interleaved=0)

    class PackedQKV(pattern.RewriteRuleClassBase):
        """GroupQueryAttention(q, k, v, ...) of the three parts of one Split (a merged q/k/v projection, in
        that order) -> GroupQueryAttention(packed, None, None, ...), which reads the parts itself. After
        RotaryInAttention: the op's packed input takes the rotation inside."""

        def __init__(self):
            super().__init__("PackedQKV")

        def pattern(self, op, x, sizes, past_key, past_value, seqlens, total, cos, sin, bias):
            q, k, v = op.Split(x, sizes, _allow_other_attributes=True, _outputs=["q", "k", "v"])
            return gqa(op, q, k, v, past_key, past_value, seqlens, total, cos, sin, bias)

        def check(self, op, sizes, q, out, pk, **_):
            result = pattern.MatchResult()
            attrs = out.producer().attributes
            parts = _const(sizes)
            head = pk.shape[-1] if pk.shape is not None and pk.shape.rank() == 4 else None
            if not split_on_last_axis(q):
                return result.fail("not a split of [batch, seq, hidden] on its last axis", q)
            if not isinstance(head, int) or parts is None or parts.tolist() != [
                    attrs.get_int("num_heads") * head, attrs.get_int("kv_num_heads") * head,
                    attrs.get_int("kv_num_heads") * head]:
                return result.fail("the split is not q, k, v of the attention's heads", sizes)
            return result

        def rewrite(self, op, x, past_key, past_value, seqlens, total, cos, sin, bias, out, **_):
            return rewritten(op, out, [x, None, None, past_key, past_value, seqlens, total, cos, sin, None, bias])

    class PackedCQ(pattern.RewriteRuleClassBase):
        """llmc.CQCachedAttention(q, k, v, ...) of the three parts of one Split (a merged q/k/v projection, in that
        order) -> llmc.CQCachedAttention(packed, None, None, ...), which reads the parts itself (cq_ort.c). Taken
        where the op rotates q itself (its 15 inputs), as the code-cache graphs of rotary models have it."""

        def __init__(self):
            super().__init__("PackedCQ")

        def pattern(self, op, x, sizes, pkc, pvc, kb, vb, kn, vn, cos, sin, bias, scale, q_cos, q_sin):
            q, k, v = op.Split(x, sizes, _allow_other_attributes=True, _outputs=["q", "k", "v"])
            return op.CQCachedAttention(q, k, v, pkc, pvc, kb, vb, kn, vn, cos, sin, bias, scale, q_cos, q_sin,
                                        _domain="llmc", _allow_other_attributes=True, _outputs=["out", "pk", "pv"])

        def check(self, op, sizes, q, kb, **_):
            result = pattern.MatchResult()
            parts = _const(sizes)
            books = kb.shape if kb.shape is not None and kb.shape.rank() == 4 else None
            if not split_on_last_axis(q):
                return result.fail("not a split of [batch, seq, hidden] on its last axis", q)
            if books is None or not all(isinstance(d, int) for d in books) or parts is None or len(parts) != 3:
                return result.fail("unknown codebook or split sizes", sizes)
            kv = books[0] * books[1] * books[3]  # H * G * c = H * D
            if parts.tolist()[1:] != [kv, kv] or parts[0] % kv:
                return result.fail("the split is not q, k, v of the cache's heads", sizes)
            return result

        def rewrite(self, op, x, pkc, pvc, kb, vb, kn, vn, cos, sin, bias, scale, q_cos, q_sin, out, **_):
            return op.CQCachedAttention(x, None, None, pkc, pvc, kb, vb, kn, vn, cos, sin, bias, scale, q_cos, q_sin,
                                        **out.producer().attributes, _domain="llmc", _outputs=3)

    return RotaryInAttention, PackedQKV, PackedCQ


def _replace_by_split(graph, members: list, merged, sizes: list[int], tag: str) -> None:
    """Put `merged` (whose output is the members' outputs side by side on the last axis) and a Split by `sizes`
    before the first member, hand each member's users its slice, and remove the members."""
    import onnx_ir as ir

    split_sizes = ir.Value(name=f"{tag}_split", const_value=ir.tensor(np.asarray(sizes, dtype=np.int64)))
    split_sizes.shape, split_sizes.type = ir.Shape([len(sizes)]), ir.TensorType(ir.DataType.INT64)
    graph.register_initializer(split_sizes)
    split = ir.node("Split", [merged.outputs[0], split_sizes], attributes={"axis": -1}, num_outputs=len(sizes),
                    name=f"{tag}_split")
    merged.outputs[0].name = f"{tag}_out"
    graph.insert_before(members[0], [merged, split])
    for node, out in zip(members, split.outputs):
        out.name = node.outputs[0].name + "_split"
        out.shape, out.type = node.outputs[0].shape, node.outputs[0].type
        node.outputs[0].replace_all_uses_with(out)
    graph.remove(members, safe=True)


def merge_matmulnbits(model) -> tuple[int, int]:
    """Merge MatMulNBits layers that read one input into one MatMulNBits and a Split; returns (merges, layers).

    Layers merge when they share the input value, K, bits, block_size and accuracy_level, and their
    codes, scales and (if present) zero points are constants of matching trailing shapes and dtypes.
    The packed tensors are concatenated along N (dim 0: one row of codes, scales and zero points per
    output feature in MatMulNBits' layout), so the merged layer computes each output column exactly as
    before. Outputs that are graph outputs are left alone.
    """
    import onnx_ir as ir

    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    groups: dict = {}
    for node in graph:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft" or not 3 <= len(node.inputs) <= 4:
            continue
        consts = [_const(v) for v in node.inputs[1:]]
        if any(c is None for c in consts) or any(id(o) in outputs for o in node.outputs):
            continue
        attrs = node.attributes
        key = (id(node.inputs[0]), len(node.inputs),
               *(attrs.get_int(a, 0) for a in ("K", "bits", "block_size", "accuracy_level")),
               *((c.dtype.str, c.shape[1:]) for c in consts))
        groups.setdefault(key, []).append((node, consts))
    merges = layers = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0][0]
        ns = [n.attributes.get_int("N") for n, _ in members]
        if any(c[0].shape[0] != n for (_, c), n in zip(members, ns)):  # codes are [N, blocks, blob]
            continue
        tag = f"llmc_merged_{merges}"
        packed = []
        for i, what in enumerate(("codes", "scales", "zero_points")[:len(members[0][1])]):
            tensor = ir.tensor(np.concatenate([c[i] for _, c in members], 0))
            v = ir.Value(name=f"{tag}_{what}", const_value=tensor, shape=ir.Shape(tensor.shape),
                         type=ir.TensorType(tensor.dtype))
            graph.register_initializer(v)
            packed.append(v)
        attrs = {a: first.attributes.get_int(a, 0) for a in ("K", "bits", "block_size", "accuracy_level")}
        merged = ir.node("MatMulNBits", [first.inputs[0], *packed], attributes={**attrs, "N": sum(ns)},
                         domain="com.microsoft", name=f"{tag}_matmul")
        old_inputs = [v for n, _ in members for v in n.inputs[1:]]
        _replace_by_split(graph, [n for n, _ in members], merged, ns, tag)
        for v in old_inputs:
            if v is not None and v.is_initializer() and not v.uses() and v.name in graph.initializers:
                del graph.initializers[v.name]
        merges += 1
        layers += len(members)
    return merges, layers


def merge_matmul(model) -> tuple[int, int]:
    """Merge float MatMuls that read one input with constant weights [K, N_i] (q/k/v, gate/up) into one MatMul
    over the weights concatenated along N and a Split; returns (merges, layers). Each output column is the
    same dot product as before. Outputs that are graph outputs are left alone."""
    import onnx_ir as ir

    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    groups: dict = {}
    for node in graph:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or any(id(o) in outputs for o in node.outputs):
            continue
        weight = _const(node.inputs[1])
        if weight is None or weight.ndim != 2 or not node.inputs[1].is_initializer():
            continue
        groups.setdefault((id(node.inputs[0]), weight.shape[0], weight.dtype.str), []).append((node, weight))
    merges = layers = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        tag = f"llmc_matmul_merged_{merges}"
        tensor = ir.tensor(np.concatenate([w for _, w in members], 1))
        weight = ir.Value(name=f"{tag}_weight", const_value=tensor, shape=ir.Shape(tensor.shape),
                          type=ir.TensorType(tensor.dtype))
        graph.register_initializer(weight)
        old = [n.inputs[1] for n, _ in members]
        merged = ir.node("MatMul", [members[0][0].inputs[0], weight], name=f"{tag}_matmul")
        merged.outputs[0].type = members[0][0].outputs[0].type
        _replace_by_split(graph, [n for n, _ in members], merged, [w.shape[1] for _, w in members], tag)
        for v in old:
            if not v.uses() and v.name in graph.initializers:
                del graph.initializers[v.name]
        merges += 1
        layers += len(members)
    return merges, layers


def biases_before_split(model) -> int:
    """Where each output of a merge's Split (`_replace_by_split`) is read by one Add of a constant bias of its
    width and nothing else (q/k/v projections with biases: Qwen2, StarCoder2), add the biases, concatenated,
    before the Split instead; returns how many Splits. The same additions, so the same values, and the
    attention can then read the projection packed (PackedQKV, PackedCQ)."""
    import onnx_ir as ir

    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    moved = 0
    for split in list(graph):
        if split.op_type != "Split" or not (split.name or "").startswith("llmc_") or len(split.inputs) < 2:
            continue
        sizes = _const(split.inputs[1])
        if sizes is None or len(sizes) != len(split.outputs):
            continue
        adds, biases, old = [], [], []
        for out, width in zip(split.outputs, sizes.tolist()):
            uses = list(out.uses())
            add = uses[0].node if len(uses) == 1 else None
            if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
                break
            other = add.inputs[1 - uses[0].idx]
            bias = _const(other)
            if bias is None or bias.shape != (width,) or any(id(o) in outputs for o in add.outputs):
                break
            adds.append(add)
            biases.append(bias)
            old.append(other)
        else:
            tensor = ir.tensor(np.concatenate(biases))
            value = ir.Value(name=f"{split.name}_bias", const_value=tensor, shape=ir.Shape(tensor.shape),
                             type=ir.TensorType(tensor.dtype))
            graph.register_initializer(value)
            source = split.inputs[0]
            add = ir.node("Add", [source, value], name=f"{split.name}_bias_add")
            add.outputs[0].name, add.outputs[0].shape, add.outputs[0].type = f"{split.name}_biased", source.shape, \
                source.type
            graph.insert_before(split, [add])
            split.replace_input_with(0, add.outputs[0])
            for node, out in zip(adds, split.outputs):
                node.outputs[0].replace_all_uses_with(out)
            graph.remove(adds, safe=True)
            for v in old:
                if v.name in graph.initializers and not v.uses():
                    del graph.initializers[v.name]
            moved += 1
    return moved


def _const_or_cast(value) -> np.ndarray | None:
    """The constant behind `value`, or behind a Cast of a constant (cast here), as numpy; None otherwise."""
    import onnx_ir as ir

    arr = _const(value)
    if arr is not None or value is None:
        return arr
    node = value.producer()
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    src = _const(node.inputs[0])
    if src is None:
        return None
    return src.astype(ir.DataType(node.attributes.get_int("to")).numpy())


def merge_binary_bases(model) -> tuple[int, int, set]:
    """Merge llmc.BinaryBasesLinear layers that read one input into one BinaryBasesLinear and a Split; returns
    (merges, layers).

    Layers merge when they share the input value, the bases, the input width, the scale groups and the
    number of kept outliers, and their signs, scales and outliers are constants (a Cast of a constant is
    cast here). Signs [nb, N, K/8] and scales [nb, N, G] are concatenated along N, outlier indices and
    values [N, k] along their rows, so each output column is computed exactly as before. Also returns the
    names of the initializers the merged layers read (directly or through a Cast), to drop once unused.
    """
    import onnx_ir as ir

    graph = model.graph
    outputs = {id(v) for v in graph.outputs}
    groups: dict = {}
    for node in graph:
        if node.op_type != "BinaryBasesLinear" or node.domain != "llmc" or any(id(o) in outputs for o in node.outputs):
            continue
        present = [v for v in node.inputs[1:] if v is not None]
        consts = [_const_or_cast(v) for v in present]
        if len(present) not in (2, 4) or any(c is None for c in consts):
            continue
        signs, scales = consts[:2]
        key = (id(node.inputs[0]), len(present), signs.shape[0], signs.shape[2], scales.shape[2],
               consts[2].shape[1] if len(consts) > 2 else 0, *(c.dtype.str for c in consts))
        groups.setdefault(key, []).append((node, consts))
    merges = layers = 0
    replaced = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0][0]
        ns = [c[0].shape[1] for _, c in members]
        for node, _ in members:
            for v in node.inputs[1:]:
                source = v.producer().inputs[0] if v is not None and v.producer() is not None else v
                if source is not None and source.is_initializer():
                    replaced.add(source.name)
        tag = f"llmc_bases_merged_{merges}"
        packed = []
        for i, (what, axis) in enumerate((("signs", 1), ("scales", 1), ("outlier_index", 0),
                                          ("outlier_values", 0))[:len(members[0][1])]):
            tensor = ir.tensor(np.concatenate([c[i] for _, c in members], axis))
            v = ir.Value(name=f"{tag}_{what}", const_value=tensor, shape=ir.Shape(tensor.shape),
                         type=ir.TensorType(tensor.dtype))
            graph.register_initializer(v)
            packed.append(v)
        merged = ir.node("BinaryBasesLinear", [first.inputs[0], *packed], domain="llmc", name=f"{tag}_linear")
        merged.outputs[0].type = first.outputs[0].type
        _replace_by_split(graph, [n for n, _ in members], merged, ns, tag)
        merges += 1
        layers += len(members)
    return merges, layers, replaced


def drop_unused_statistics(model) -> int:
    """Leave out the optional outputs of the norms (the mean and inverse standard deviation of
    (Skip)SimplifiedLayerNormalization and LayerNormalization, a skip sum nobody reads) that no node and no graph
    output reads: ONNX Runtime's kernels write every output they are given (SmolLM2 FP32 at batch 1: the 60
    SkipSimplifiedLayerNormalizations 0.77 → 0.51 ms per step). Returns how many it left out."""
    dropped = 0
    for node in model.graph:
        if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization"):
            for out in node.outputs[1:]:
                if out.name and not out.uses() and not out.is_graph_output():
                    out.name = ""  # written as an absent output
                    dropped += 1
    return dropped


def fuse(model_path: str, max_positions: int) -> dict[str, int]:
    """Rewrite `model_path` (and its external data file beside it) in place; returns the fusion counts.

    `max_positions` is the number of rows of the RotaryEmbedding cos/sin caches: positions at or
    beyond it are outside what the fused graph can rotate (the model's `max_position_embeddings`).
    The counts are the fused ops in the rewritten graph ("SkipSimplifiedLayerNormalization": 60 on
    SmolLM2) and the merges of MatMulNBits; a rewrite that never fired has count 0.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import IdentityEliminationPass
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_ruleset
    from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset
    from onnxscript.rewriter.pattern import RewriteRuleSet

    from llmc.errors import ExportError

    try:
        model = ir.load(model_path)
        rms_normalization_ruleset.apply_to_model(model)
        RewriteRuleSet([_unit_rms_rule_class().rule()]).apply_to_model(model)
        skip_rms_normalization_ruleset.apply_to_model(model)
        RewriteRuleSet([_rotary_rule_class().rule(max_positions=max_positions)]).apply_to_model(model)
        optimizer.remove_unused_nodes(model)  # the tables the rotations above no longer read
        tables_rule, caches = _rotary_tables_rule_class(), {}
        tables = RewriteRuleSet([tables_rule.rule(function=f, max_positions=max_positions, caches=caches)
                                 for f in ("Cos", "Sin")]).apply_to_model(model)
        signed_sin = _signed_sin_rule_class().rule(caches=caches).apply_to_model(model) if tables else 0
        round_trip, rotary_on_hidden = _heads_rule_classes()
        RewriteRuleSet([rotary_on_hidden.rule(), round_trip.rule()]).apply_to_model(model)
        merges, layers = merge_matmulnbits(model)
        float_merges, float_layers = merge_matmul(model)
        bases_merges, bases_layers, replaced = merge_binary_bases(model)
        biased = biases_before_split(model)
        IdentityEliminationPass()(model)  # the values' head round trips (HeadsRoundTrip), between Split and attention
        rotary_in_attention, packed_qkv, packed_cq = _attention_rule_classes()
        in_attention = rotary_in_attention.rule().apply_to_model(model)
        packed = packed_qkv.rule().apply_to_model(model) + packed_cq.rule().apply_to_model(model)
        optimizer.remove_unused_nodes(model)
        drop_unused_statistics(model)
        for name in replaced:  # the merged layers' own signs, scales and outliers, now read by nobody
            if name in model.graph.initializers and not model.graph.initializers[name].uses():
                del model.graph.initializers[name]
        ops = Counter(n.op_type for n in model.graph if n.domain in ("", "com.microsoft"))
        counts = {name: ops.get(name, 0) for name in FUSED_OPS}
        counts.update({"MatMulMerge": float_merges, "MatMulMerge.linears": float_layers,
                       "MatMulNBitsMerge": merges, "MatMulNBitsMerge.linears": layers,
                       "BinaryBasesLinearMerge": bases_merges, "BinaryBasesLinearMerge.linears": bases_layers,
                       "RotaryInAttention": in_attention, "PackedQKV": packed, "RotaryTables": tables,
                       "RotarySignedSin": signed_sin,
                       "BiasBeforeSplit": biased})
        # ir.save rewrites the data file the loaded tensors point into, then says (once per tensor) that
        # they are stale; the model is not used after saving
        quiet = logging.getLogger("onnx_ir")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            ir.save(model, model_path, external_data=os.path.basename(model_path) + ".data")
        finally:
            quiet.setLevel(level)
    except Exception as e:
        raise ExportError(f"the fused lowering failed ({type(e).__name__}: {e}); export with the backend option "
                          "fuse=false") from e
    return counts
