"""CompressionSummary: scheme labels, sizes, coverage and phases of a compression run."""

from __future__ import annotations

import pytest
import torch
from helpers import TwoLayer
from torch import nn
from torch.nn.utils import parametrize

from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.summary import (
    CompressionSummary,
    parameter_bytes,
    scheme_label,
)


@pytest.mark.parametrize("name", sorted(set(PRESET_SCHEMES) - {"INT8"}))  # W8A8's other name
def test_a_preset_scheme_is_labelled_with_its_name(name):
    assert scheme_label(preset_scheme(name, ["Linear"])).startswith(f"{name} (")


def test_scheme_labels_say_bits_groups_symmetry_and_activations():
    assert scheme_label(preset_scheme("W4A16", ["Linear"])) == "W4A16 (int4 g128)"
    assert scheme_label(preset_scheme("W4A16_ASYM", ["Linear"])) == "W4A16_ASYM (int4 asym g128)"
    assert (
        scheme_label(preset_scheme("W8A8", ["Linear"]))
        == "W8A8 (int8 per-channel, act int8 per-token dynamic)"
    )
    custom = QuantizationScheme(
        ["Linear"], QuantizationArgs(num_bits=3, strategy="group", group_size=32), None
    )
    assert scheme_label(custom) == "W3A16 (int3 g32)"


def test_parameter_bytes_count_tied_weights_once_in_their_dtype():
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head).to(torch.bfloat16)
    assert parameter_bytes(model) == (10 * 4 * 2, "bfloat16")


def test_the_summary_sorts_linear_layers_into_quantized_sparse_ignored_and_left_out():
    torch.manual_seed(0)
    model = TwoLayer()
    model.fc1.quantization_scheme = preset_scheme("W8A16", ["fc1"])
    with torch.no_grad():
        model.fc2.weight.view(-1, 4)[:, :2] = 0  # 2 of every 4 zero: 2:4 sparse
    summary = CompressionSummary()
    summary.describe(model)
    assert summary.quantized == {"fc1": "W8A16 (int8 g128)"}
    assert summary.sparse == {"fc2": "2:4 sparse"}
    assert summary.schemes == {"W8A16 (int8 g128)": 1, "2:4 sparse": 1}
    assert (summary.ignored, summary.left_out, summary.linear_layers) == ([], [], 2)

    plain = TwoLayer()
    summary.describe(plain, ignore=["fc2"])
    assert (summary.quantized, summary.sparse) == ({}, {})
    assert (summary.ignored, summary.left_out) == (["fc2"], ["fc1"])
    text = summary.format()
    assert "ignored: 1 (fc2)" in text
    assert "left out (neither compressed nor ignored): 1 (fc1)" in text


def test_many_left_out_layers_are_counted_with_a_few_named():
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(12)))
    summary = CompressionSummary()
    summary.describe(model)
    assert "left out (neither compressed nor ignored): 12 (e.g. 0, 1, 2)" in summary.format()


def test_the_size_line_compares_parameter_bytes_with_the_saved_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 2500)
    (tmp_path / "config.json").write_text("{}")
    summary = CompressionSummary(size_before=10_000, dtype="float32")
    assert "size: 10.0 KB of float32 parameters (not saved)" in summary.format()
    summary.record_checkpoint(tmp_path)
    assert summary.size_after == 2500
    assert (
        f"size: 10.0 KB of float32 parameters -> 2.5 KB of safetensors files in {tmp_path}, "
        "4.00x smaller"
    ) in summary.format()


def test_phases_add_up_their_seconds_even_when_they_fail():
    summary = CompressionSummary()
    with summary.phase("compress"):
        pass
    first = summary.phases["compress"]
    with pytest.raises(RuntimeError), summary.phase("compress"):
        raise RuntimeError("boom")
    assert summary.phases["compress"] >= first >= 0
    assert list(summary.phases) == ["compress"]
    assert "time: compress" in summary.format()


def test_quality_before_and_after_with_the_relative_change():
    summary = CompressionSummary()
    assert "perplexity" not in summary.format()
    summary.set_quality("perplexity", 10.0, 10.5)
    assert "perplexity: 10 before -> 10.5 after (+5.0%)" in summary.format()
    summary.set_quality("perplexity", 10.0, None)
    assert "perplexity: 10 before -> n/a after" in summary.format()


def test_a_quantized_layer_that_is_not_linear_is_counted():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1))
    model[1].quantization_scheme = preset_scheme("W8A16", ["1"])
    summary = CompressionSummary()
    summary.describe(model)
    assert summary.quantized == {"1": "W8A16 (int8 g128)"}
    assert (summary.linear_layers, summary.left_out) == (2, ["0"])


class Blocks(nn.Module):
    """``count`` blocks of one linear layer and a norm each."""

    def __init__(self, count: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(8, 8), "norm": nn.LayerNorm(8)}) for _ in range(count)
        )


def test_the_coverage_counts_each_weight_matrix_of_the_blocks_once():
    model = Blocks(3)
    model.layers[2]["proj"].weight = model.layers[1]["proj"].weight  # tied: counted once
    parametrize.register_parametrization(model.layers[0]["proj"], "weight", nn.Identity())
    summary = CompressionSummary()
    summary.describe(model)
    assert summary.coverage.elements == {"layers.0.proj.weight": 64, "layers.1.proj.weight": 64}
    assert summary.coverage.scope == "decoder blocks layers.0 to layers.2"


def test_a_layer_both_quantized_and_sparse_carries_both_labels():
    model = Blocks()
    layer = model.layers[0]["proj"]
    layer.quantization_scheme = preset_scheme("W8A16", ["Linear"])
    with torch.no_grad():
        layer.weight.view(-1, 4)[:, :2] = 0
    summary = CompressionSummary()
    summary.describe(model, ignore=["re:.*1.proj"])
    assert summary.coverage.compressed == {"layers.0.proj.weight": "W8A16 (int8 g128) + 2:4 sparse"}
    assert summary.coverage.ignored == ["layers.1.proj.weight"]


def test_a_targeted_weight_is_pruned_with_any_zeros_and_left_out_without():
    model = Blocks()
    with torch.no_grad():
        model.layers[0]["proj"].weight[0, :4] = 0  # 4 of 64: too few to be saved sparse
    summary = CompressionSummary()
    summary.describe(model, targeted=["layers.0.proj", "layers.1.proj"])
    assert summary.coverage.compressed == {"layers.0.proj.weight": "pruned under 50% (saved dense)"}
    assert summary.coverage.left_out == {
        "layers.1.proj.weight": "targeted, but left unchanged by the run"
    }


def test_left_out_weights_of_many_blocks_are_named_once_with_a_count():
    summary = CompressionSummary()
    summary.describe(Blocks(60))
    assert len(summary.coverage.left_out) == 60
    assert (
        summary.coverage.describe_left_out()
        == "Linear layers no target matches: layers.*.proj.weight x60"
    )
    assert "0 of 60 weight tensors compressed (0.0% of 3,840 elements), 0 ignored" in (
        summary.format()
    )


def test_labels_of_formats_with_their_own_scales_name_the_format():
    labels = {
        name: scheme_label(preset_scheme(name, ["Linear"]))
        for name in ("NVFP4A16", "MXFP4A16", "MXFP8A16", "FP8_BLOCK")
    }
    assert labels == {
        "NVFP4A16": "NVFP4A16 (nvfp4 g16)",
        "MXFP4A16": "MXFP4A16 (mxfp4 g32)",
        "MXFP8A16": "MXFP8A16 (mxfp8 g32)",
        "FP8_BLOCK": "FP8_BLOCK (fp8 block 128x128, act fp8 g128 dynamic)",
    }
