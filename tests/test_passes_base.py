"""Pass registry, spec parsing and PassManager ordering."""

from dataclasses import dataclass

import pytest

import llmc
from llmc.errors import ConfigError, PassError, PassOrderError
from llmc.passes_base import Pass, PassManager, PassResult, parse_pass_spec, register_pass


@register_pass("test_quantize_like")
@dataclass(frozen=True)
class QuantizeLike(Pass):
    """Test pass: consumes dense weights (like any weight quantizer)."""

    bits: int = 4
    group: int = 64
    symmetric: bool = False
    scale: float = 1.0
    targets: tuple[str, ...] = ("mlp",)
    invalidates = ("dense_linear_weights",)
    provides = ("quantized_weights",)

    def run(self, gm, ctx):
        return PassResult(gm, False)


@register_pass("test_needs_quantized")
@dataclass(frozen=True)
class NeedsQuantized(Pass):
    """Test pass: requires quantized weights."""

    requires = ("quantized_weights",)

    def run(self, gm, ctx):
        return PassResult(gm, False)


@register_pass("test_needs_calibration")
@dataclass(frozen=True)
class NeedsCalibration(Pass):
    """Test pass: requires calibration data."""

    requires = ("calibration",)

    def run(self, gm, ctx):
        return PassResult(gm, False)


@register_pass("test_explodes")
@dataclass(frozen=True)
class Explodes(Pass):
    """Test pass: fails while running."""

    def run(self, gm, ctx):
        raise RuntimeError("boom")


def test_spec_parsing_types_and_round_trip():
    p = parse_pass_spec("test_quantize_like:bits=2,group=8,symmetric=true,scale=0.5,targets=mlp+self_attn")
    assert p == QuantizeLike(bits=2, group=8, symmetric=True, scale=0.5, targets=("mlp", "self_attn"))
    assert parse_pass_spec(p.spec()) == p
    assert parse_pass_spec("test_quantize_like").spec() == "test_quantize_like"


@pytest.mark.parametrize("spec,message", [
    ("nope", "unknown pass 'nope'"),
    ("test_quantize_lik", "did you mean 'test_quantize_like'"),
    ("test_quantize_like:bitz=2", "has no option 'bitz'.*did you mean 'bits'"),
    ("test_quantize_like:bits=two", "expected int, got 'two'"),
    ("test_quantize_like:symmetric=maybe", "expected true/false"),
    ("test_quantize_like:bits", "has no value"),
    ("test_quantize_like:bits=2,bits=3", "given twice"),
    ("", "empty pass spec"),
])
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_pass_spec(spec)


def test_fold_norm_scales_validates_its_config():
    with pytest.raises(ConfigError, match="regular expression"):
        parse_pass_spec("fold_norm_scales:norms=(")


def test_order_error_names_the_pass_that_removed_a_fact():
    with pytest.raises(PassOrderError, match="run 'fold_norm_scales' before 'test_quantize_like'"):
        PassManager(["test_quantize_like", "fold_norm_scales"]).check()
    PassManager(["fold_norm_scales", "test_quantize_like"]).check()


def test_order_error_names_a_later_provider():
    with pytest.raises(PassOrderError, match="move 'test_quantize_like' before 'test_needs_quantized'"):
        PassManager(["test_needs_quantized", "test_quantize_like"]).check()


def test_order_error_names_a_registered_provider():
    with pytest.raises(PassOrderError, match="add 'test_quantize_like' before it"):
        PassManager(["test_needs_quantized"]).check()


def test_missing_calibration_is_reported_before_tracing(tiny_models):
    with pytest.raises(PassOrderError, match="calibration data"):
        llmc.compile(tiny_models["llama"], passes=["test_needs_calibration"])


def test_failing_pass_is_named_with_what_ran_before(tiny_models):
    with pytest.raises(PassError, match=r"pass 'test_explodes' failed \(after: fold_norm_scales\): RuntimeError: boom"):
        llmc.compile(tiny_models["llama"], passes=["fold_norm_scales", "test_explodes"])


def test_history_records_each_pass(tiny_models):
    cm = llmc.compile(tiny_models["llama"], passes=["fold_norm_scales", "test_quantize_like:bits=3"])
    names = [(h.name, h.spec) for h in cm.program.history]
    assert names == [("fold_norm_scales", "fold_norm_scales"), ("test_quantize_like", "test_quantize_like:bits=3")]
    assert all(h.seconds >= 0 for h in cm.program.history)
    assert cm.program.history[0].stats["folded"] == 5
