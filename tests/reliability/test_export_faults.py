"""Export and load under faults: every preset through the installed transformers, corrupted
checkpoints, bad ``quantization_config`` entries, and saves killed at any point."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from export_models import ARCHITECTURE, QUIET, compressed, prune_2_4, tiny_model, token_ids
from loguru import logger
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_compress.export import ExportError, load_compressed, save_compressed
from lightning_compress.export import staging as export_staging
from lightning_compress.export import writer as export_writer
from lightning_compress.export.layout import differences, prepared_layout, written_layout
from lightning_compress.export.schemes import FALLBACK_FORMAT, to_ct_scheme
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization import PRESET_SCHEMES

README = Path(__file__).parents[2] / "README.md"
SEED = 15
PROBE = token_ids(count=2, length=12, seed=7)
WIDE = {
    **ARCHITECTURE,
    "num_hidden_layers": 1,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_key_value_heads": 4,
}
"""One decoder layer wide enough for the presets' groups and blocks of 128."""
BFLOAT16_ONLY = (
    *("NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "MXFP4XFP8"),
    *("MXFP6A16", "MXFP6A8", "MXFP8A16", "MXFP8"),
)
"""fp4 and MX presets, saved in bfloat16 only (tests/export/test_fp4_formats.py and
test_fp4_activations.py check them)."""


@pytest.fixture(name="warnings")
def warnings_fixture() -> Iterator[list[str]]:
    """The library's warnings while the test runs."""
    messages: list[str] = []
    handler = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(handler)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


def local_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def edit_config(path: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def hidden_entries(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir() if entry.name.startswith("."))


# Every preset the README lists, through the installed transformers ---------------------------


def readme_presets() -> list[str]:
    line = next(line for line in README.read_text().splitlines() if "presets `W8A16`" in line)
    return re.findall(r"`([A-Z0-9_]+)`", line.split("presets", 1)[1].split(", or", 1)[0])


def test_the_readme_lists_every_preset_scheme():
    assert readme_presets() == list(PRESET_SCHEMES)


def wide_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**WIDE)).eval()


def prune_half(model: nn.Module) -> None:
    """Zeroes the smaller half of each decoder linear weight (unstructured)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                weight = module.weight
                weight.masked_fill_(weight.abs() <= weight.abs().median(), 0.0)


SPARSE = {"2:4": (prune_2_4, None), "50%": (prune_half, None), "2:4+W4A16": (prune_2_4, "W4A16")}


def compressed_wide(preset: str) -> nn.Module:
    model = wide_model()
    prune, scheme = SPARSE.get(preset, (None, preset))
    if prune is not None:
        prune(model)
    if scheme is not None:
        modifier = QuantizationModifier(scheme=scheme, targets=["Linear"], ignore=["lm_head"])
        oneshot(model, modifier, token_ids(4, 16), num_calibration_samples=4, trainer_kwargs=QUIET)
    return model


@pytest.mark.parametrize(
    "preset", [*(name for name in PRESET_SCHEMES if name not in BFLOAT16_ONLY), *SPARSE]
)
def test_every_readme_preset_loads_in_transformers_as_it_is_in_memory(preset, tmp_path):
    model = compressed_wide(preset)
    path = save_compressed(model, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    reference, restored = logits(model), logits(loaded)  # the first forward decompresses

    # The format stores the codes and scales exactly: each weight reads back within the
    # rounding of the two dequantizations (2 ulps).
    expected_layers = dict(model.named_modules())
    for name, module in loaded.named_modules():
        if isinstance(module, nn.Linear):
            ours = expected_layers[name]
            eps = torch.finfo(ours.weight.dtype).eps
            torch.testing.assert_close(module.weight, ours.weight, rtol=2 * eps, atol=0, msg=name)
            scheme = getattr(module, "quantization_scheme", None)
            assert (scheme is None) == (getattr(ours, "quantization_scheme", None) is None), name
            if scheme is not None:
                has_inputs = ours.quantization_scheme.input_activations is not None
                assert (scheme.input_activations is not None) == has_inputs, name
    scale = float(reference.abs().max())
    # Activation codes may flip by one step where the two sides round a tie differently.
    torch.testing.assert_close(restored, reference, rtol=1e-3, atol=1e-3 * scale)
    torch.testing.assert_close(logits(load_compressed(path)), reference, rtol=0, atol=0)


def test_the_installed_compressed_tensors_cannot_load_its_own_asymmetric_packing():
    """compressed-tensors 0.20.1 packs asymmetric zero points when it writes pack-quantized,
    but prepares them unpacked when transformers loads (PackedQuantizationCompressor.compress,
    meta-device branch): the reason asymmetric layers are stored naive-quantized."""
    model = compressed_wide("W4A16_ASYM")
    layer = model.model.layers[0].self_attn.q_proj
    scheme = to_ct_scheme("q_proj", layer).model_copy(update={"format": "pack-quantized"})
    shape = ((128, 128), False, torch.float32, scheme)
    assert differences(written_layout(*shape), prepared_layout(*shape)) == [
        "weight_zero_point is [16, 1] int32, expected [128, 1] int8"
    ]


def test_asymmetric_weights_are_stored_in_a_format_transformers_loads(tmp_path, warnings):
    model = compressed_wide("W4A16_ASYM")
    path = save_compressed(model, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["format"] == FALLBACK_FORMAT == "naive-quantized"
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is False
    [warning] = [message for message in warnings if FALLBACK_FORMAT in message]
    assert "7 layers" in warning and "pack-quantized" in warning and "weight_zero_point" in warning
    assert "pack_asymmetric=True" in warning  # how to get what vLLM serves
    stored = local_tensors(path)
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert stored["model.layers.0.mlp.down_proj.weight_zero_point"].shape == (128, 2)


def test_asymmetric_weights_are_packed_for_vllm_on_request(tmp_path, warnings):
    """What vLLM serves and llm-compressor writes: packed codes and packed zero points."""
    model = compressed_wide("W4A16_ASYM")
    path = save_compressed(model, tmp_path / "ckpt", pack_asymmetric=True)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    [warning] = [message for message in warnings if "pack_asymmetric=True" in message]
    assert "7 layers" in warning and "cannot" in warning and "weight_zero_point" in warning
    stored = local_tensors(path)
    assert stored["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    assert stored["model.layers.0.mlp.down_proj.weight_zero_point"].shape == (16, 2)
    torch.testing.assert_close(logits(load_compressed(path)), logits(model), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="mismatched_sizes"):  # the upstream mismatch
        AutoModelForCausalLM.from_pretrained(path)


def test_pack_asymmetric_leaves_symmetric_layers_as_they_are(tmp_path):
    model = compressed_wide("W4A16")
    path = save_compressed(model, tmp_path / "ckpt", pack_asymmetric=True)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-3, atol=1e-3)


def test_a_layer_transformers_cannot_load_is_refused_at_export(tmp_path):
    model = compressed_wide("W4A16")
    layer = model.model.layers[0].mlp.up_proj
    layer.register_buffer("weight_extra", torch.zeros(3))
    with pytest.raises(ExportError, match=r"'model\.layers\.0\.mlp\.up_proj'.*weight_extra"):
        save_compressed(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# Corrupted checkpoints ------------------------------------------------------------------------


@pytest.fixture(name="saved", scope="module")
def saved_fixture(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the tiny Llama, W4A16 (groups of 32), W8A8 and asymmetric W4 groups."""
    root = tmp_path_factory.mktemp("saved")
    asym = {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False}
    groups = {"group_0": {"targets": ["Linear"], "weights": asym}}
    asym_model = tiny_model("llama")
    modifier = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    oneshot(asym_model, modifier, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    models = {
        "W4A16": compressed("llama", "W4A16"),
        "W8A8": compressed("llama", "W8A8"),
        "ASYM": asym_model,
    }
    return {name: save_compressed(model, root / name) for name, model in models.items()}


def copy_of(saved: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[name], tmp_path / name))


LAYER = "model.layers.1.self_attn.q_proj"


def group_weights(config: dict) -> dict:
    return config["quantization_config"]["config_groups"]["group_0"]["weights"]


CONFIG_EDITS = {
    "num_bits 4 -> 3": ("W4A16", lambda c: group_weights(c).update(num_bits=3), "weight_packed"),
    "num_bits 4 -> 8": ("W4A16", lambda c: group_weights(c).update(num_bits=8), "weight_packed"),
    "group_size 32 -> 64": (
        "W4A16",
        lambda c: group_weights(c).update(group_size=64),
        "weight_scale",
    ),
    "symmetric -> asymmetric": (
        "W4A16",
        lambda c: group_weights(c).update(symmetric=False),
        "weight_zero_point missing",
    ),
    "asymmetric -> symmetric": (
        "ASYM",
        lambda c: group_weights(c).update(symmetric=True),
        "unexpected weight_zero_point",
    ),
    "W8A8 num_bits 8 -> 4": ("W8A8", lambda c: group_weights(c).update(num_bits=4), "codes"),
    "channel -> tensor": (
        "W8A8",
        lambda c: group_weights(c).update(strategy="tensor"),
        "weight_scale",
    ),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_a_config_that_does_not_match_the_packed_data_is_refused(edit, saved, tmp_path):
    name, change, what = CONFIG_EDITS[edit]
    path = copy_of(saved, name, tmp_path)
    edit_config(path, change)
    with pytest.raises(ExportError, match=r"model\.safetensors: layer '[\w.]+'") as error:
        load_compressed(path)
    assert what in str(error.value)


def drop(key: str) -> Callable[[dict], None]:
    return lambda tensors: tensors.pop(key)


def change_tensor(key: str, function: Callable[[torch.Tensor], torch.Tensor]):
    return lambda tensors: tensors.update({key: function(tensors[key])})


TENSOR_EDITS = {
    "missing scale": ("W4A16", drop(f"{LAYER}.weight_scale"), "weight_scale missing"),
    "missing zero point": ("ASYM", drop(f"{LAYER}.weight_zero_point"), "zero_point missing"),
    "missing plain tensor": ("W4A16", drop("model.norm.weight"), "missing ['model.norm.weight']"),
    "extra tensor": (
        "W4A16",
        lambda t: t.update({"model.layers.0.extra": torch.zeros(2)}),
        "unexpected ['model.layers.0.extra']",
    ),
    "extra tensor of a layer": (
        "W8A8",
        lambda t: t.update({f"{LAYER}.weight_g_idx": torch.zeros(64, dtype=torch.int32)}),
        "unexpected weight_g_idx",
    ),
    "packed weight as float": (
        "W4A16",
        change_tensor(f"{LAYER}.weight_packed", lambda x: x.float()),
        "weight_packed is [64, 8] float32, expected [64, 8] int32",
    ),
    "int8 codes as int32": (
        "W8A8",
        change_tensor(f"{LAYER}.weight", lambda x: x.int()),
        "weight is [64, 64] int32, expected [64, 64] int8",
    ),
    "scale of another shape": (
        "W4A16",
        change_tensor(f"{LAYER}.weight_scale", lambda x: x[:, :1].contiguous()),
        "weight_scale is [64, 1]",
    ),
    "weight_shape edited": (
        "W4A16",
        change_tensor(f"{LAYER}.weight_shape", lambda x: x.flip(0).contiguous() + 1),
        "weight_shape is [65, 65]",
    ),
    "plain tensor as int": (
        "W4A16",
        change_tensor("model.norm.weight", lambda x: x.to(torch.int8)),
        "model.norm.weight is [64] int8, expected [64] float32",
    ),
    "plain tensor of another shape": (
        "W8A8",
        change_tensor("model.embed_tokens.weight", lambda x: x[:-1].contiguous()),
        "model.embed_tokens.weight is [127, 64]",
    ),
}


@pytest.mark.parametrize("edit", list(TENSOR_EDITS))
def test_missing_extra_and_misshapen_tensors_are_named_with_their_file(edit, saved, tmp_path):
    name, change, what = TENSOR_EDITS[edit]
    path = copy_of(saved, name, tmp_path)
    tensors = local_tensors(path)
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=re.escape(str(path / "model.safetensors"))) as error:
        load_compressed(path)
    assert what in str(error.value)


def test_truncated_safetensors_are_named_at_any_length(saved, tmp_path):
    rng = random.Random(SEED)
    path = copy_of(saved, "W4A16", tmp_path)
    content = (path / "model.safetensors").read_bytes()
    for cut in [0, 7, *rng.sample(range(8, len(content)), 6), len(content) - 1]:
        (path / "model.safetensors").write_bytes(content[:cut])
        with pytest.raises(ExportError, match=r"model\.safetensors: cannot be read.*truncated"):
            load_compressed(path)


def flip_header_bytes(saved: dict[str, Path], tmp_path: Path, count: int) -> None:
    """Changes one random byte of the safetensors header at a time: loading must raise an
    ExportError or give exactly the saved model, never a raw error or another model."""
    rng = random.Random(SEED)
    path = copy_of(saved, "W4A16", tmp_path)
    content = (path / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(content[:8], "little")
    expected = logits(load_compressed(path))
    outcomes = {"refused": 0, "unchanged": 0}
    for _ in range(count):
        corrupt = bytearray(content)
        corrupt[rng.randrange(header_end)] ^= rng.randrange(1, 256)
        (path / "model.safetensors").write_bytes(bytes(corrupt))
        try:
            model = load_compressed(path)
        except ExportError as error:
            assert re.search(r"model\.safetensors|config\.json", str(error)), error
            outcomes["refused"] += 1
            continue
        torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
        outcomes["unchanged"] += 1
    assert outcomes["refused"] > count // 2, outcomes


def test_corrupted_headers_give_a_named_error_or_the_saved_model(saved, tmp_path):
    flip_header_bytes(saved, tmp_path, count=12)


@pytest.mark.slow
def test_many_corrupted_headers_give_a_named_error_or_the_saved_model(saved, tmp_path):
    flip_header_bytes(saved, tmp_path, count=300)


def test_a_shard_missing_or_short_of_its_index_is_named(tmp_path):
    model = compressed("llama", "W4A16")
    path = save_compressed(model, tmp_path / "ckpt", max_shard_bytes=30_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    short = load_file(path / shards[1])
    short.pop(next(iter(short)))
    save_file(short, path / shards[1], metadata={"format": "pt"})
    with pytest.raises(ExportError, match=rf"{shards[1]}: lacks 1 tensors"):
        load_compressed(path)
    (path / shards[1]).unlink()
    with pytest.raises(ExportError, match=rf"{shards[1]}, listed in .*index\.json.*incomplete"):
        load_compressed(path)


@pytest.mark.parametrize("entry", ["oops", 3, ["compressed-tensors"], {"quant_method": "gptq"}])
def test_a_quantization_config_of_the_wrong_kind_is_named(entry, saved, tmp_path):
    path = copy_of(saved, "W4A16", tmp_path)
    edit_config(path, lambda config: config.update(quantization_config=entry))
    with pytest.raises(ExportError, match=r"config\.json: quantization_config"):
        load_compressed(path)


def test_an_invalid_config_field_is_named_by_its_path(saved, tmp_path):
    path = copy_of(saved, "W4A16", tmp_path)
    edit_config(path, lambda config: group_weights(config).update(num_bits="four"))
    pattern = r"config\.json: quantization_config\.config_groups\.group_0\.weights\.num_bits: "
    with pytest.raises(ExportError, match=pattern + r"Input should be a valid integer[^;]*$"):
        load_compressed(path)


def test_w8a8_without_its_input_activations_is_not_loaded_as_w8a16(saved, tmp_path):
    path = copy_of(saved, "W8A8", tmp_path)
    group = "group_0"
    edit_config(
        path,
        lambda c: c["quantization_config"]["config_groups"][group].update(input_activations=None),
    )
    with pytest.raises(
        ExportError,
        match=r"config_groups\.group_0: format 'int-quantized' does not store.*input_activ",
    ):
        load_compressed(path)


# Saves killed at any point --------------------------------------------------------------------


@pytest.fixture(name="models", scope="module")
def models_fixture(tmp_path_factory) -> dict[str, object]:
    """Two different W4A16 models, and a reference checkpoint of each."""
    root = tmp_path_factory.mktemp("references")
    old, new = compressed("llama", "W4A16", seed=0), compressed("llama", "W4A16", seed=1)
    return {
        "old": old,
        "new": new,
        "old_tensors": local_tensors(save_compressed(old, root / "old")),
        "new_tensors": local_tensors(save_compressed(new, root / "new")),
    }


CHILD_DEADLINE_S = 120.0


def in_child(work: Callable[[], None], kill_after: float | None = None) -> int:
    """Runs ``work`` in a forked process, SIGKILLed after ``kill_after`` seconds if given.

    The child computes on one thread: the thread pool of the forking process is not in
    the child, and OpenMP can wait for it forever. A child still running after
    ``CHILD_DEADLINE_S`` is killed and the test fails, instead of hanging the suite.

    Returns:
        The signal that ended the process (0: ``work`` returned).
    """
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            work()
        finally:
            os._exit(0)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)  # an ended child stays a zombie until waited for
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked save did not end within {CHILD_DEADLINE_S:.0f} s")
        time.sleep(0.01)
    status = ended[1]
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def kill_at(module: object, name: str, call: int) -> None:
    """Makes this process die by SIGKILL at the ``call``-th call of ``module.name``."""
    original, count = getattr(module, name), [0]

    def dying(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, dying)


def same_tensors(path: Path, expected: dict[str, torch.Tensor]) -> bool:
    stored = local_tensors(path)
    return stored.keys() == expected.keys() and all(
        torch.equal(stored[k], expected[k]) for k in stored
    )


# Each step of an overwrite, and which checkpoint the path must hold once recovered.
KILL_POINTS = {
    "writing the first shard": (export_writer, "save_file", 1, "old"),
    "fsyncing the first file": (os, "fsync", 1, "old"),
    "moving the old checkpoint away": (os, "replace", 1, "old"),
    "between the two renames": (os, "replace", 2, "new"),
    "removing the work directory": (shutil, "rmtree", 1, "new"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.parametrize("recover_by", ["load", "save"])
def test_a_killed_overwrite_always_leaves_a_complete_checkpoint(
    point, recover_by, models, tmp_path
):
    module, name, call, expected = KILL_POINTS[point]
    target = save_compressed(models["old"], tmp_path / "ckpt")

    def overwrite() -> None:
        kill_at(module, name, call)
        save_compressed(models["new"], target, overwrite=True)

    assert in_child(overwrite) == signal.SIGKILL
    assert len(hidden_entries(tmp_path)) == 1  # the dead save's work directory
    if recover_by == "load":
        torch.testing.assert_close(
            logits(load_compressed(target)), logits(models[expected]), rtol=0, atol=0
        )
    else:
        with pytest.raises(ExportError, match="not empty"):
            save_compressed(models["new"], target)
    assert same_tensors(target, models[f"{expected}_tensors"])
    assert hidden_entries(tmp_path) == []


def test_a_killed_first_save_leaves_nothing_that_looks_like_a_checkpoint(models, tmp_path):
    target = tmp_path / "ckpt"

    def save() -> None:
        kill_at(export_writer, "save_file", 1)
        save_compressed(models["new"], target)

    assert in_child(save) == signal.SIGKILL
    assert not target.exists()
    [work] = hidden_entries(tmp_path)
    assert work.startswith(".ckpt.") and work.endswith(".partial")
    save_compressed(models["old"], target)
    assert hidden_entries(tmp_path) == []
    assert same_tensors(target, models["old_tensors"])


def test_only_stale_work_directories_of_the_same_target_are_removed(models, tmp_path):
    target = tmp_path / "ckpt"
    live, lock = export_staging._create_work_dir(target)  # a save in progress here
    foreign = tmp_path / ".ckpt.0123456789ab.partial"  # matches the name, not ours
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"keep")
    other = tmp_path / ".other.0123456789ab.partial"
    other.mkdir()
    (other / "data.bin").write_bytes(b"keep")

    def die_mid_save() -> None:
        kill_at(export_writer, "save_file", 1)
        save_compressed(models["new"], target)

    assert in_child(die_mid_save) == signal.SIGKILL
    unstarted = tmp_path / ".ckpt.aaaaaaaaaaaa.partial"  # died before writing its marker
    unstarted.mkdir()
    (unstarted / export_staging.MARKER_NAME).touch()
    assert len(hidden_entries(tmp_path)) == 5
    try:
        save_compressed(models["old"], target)
        assert sorted(hidden_entries(tmp_path)) == sorted([live.name, foreign.name, other.name])
    finally:
        os.close(lock)
        shutil.rmtree(live)


def test_every_file_is_fsynced_before_the_rename_and_the_directory_after(
    models, tmp_path, monkeypatch
):
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        fsync(descriptor)

    def recording_replace(source, destination) -> None:
        events.append(("replace", str(destination)))
        replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    target = save_compressed(models["new"], tmp_path / "ckpt")

    published = events.index(("replace", str(target)))
    synced_before = {Path(path).name for kind, path in events[:published] if kind == "fsync"}
    assert {path.name for path in target.iterdir()} | {"new"} <= synced_before
    assert ("fsync", str(tmp_path)) in events[published:]


def kill_at_random_times(models: dict, tmp_path: Path, count: int) -> None:
    rng = random.Random(SEED)
    target = save_compressed(models["old"], tmp_path / "ckpt")
    started = time.perf_counter()
    save_compressed(models["new"], tmp_path / "timing")
    duration = time.perf_counter() - started
    killed = 0
    for _ in range(count):
        before = rng.choice(["old", "new"])
        save_compressed(models[before], target, overwrite=True)
        overwrite = lambda: save_compressed(models["new"], target, overwrite=True)  # noqa: E731
        killed += in_child(overwrite, rng.uniform(0, 1.5 * duration)) == signal.SIGKILL
        model = load_compressed(target)  # finishes what a dead save left
        [held] = [
            name for name in {before, "new"} if same_tensors(target, models[f"{name}_tensors"])
        ]
        torch.testing.assert_close(logits(model), logits(models[held]), rtol=0, atol=0)
        assert hidden_entries(tmp_path) == []
    assert killed > 0


def test_saves_killed_at_random_times_leave_the_old_or_the_new_checkpoint(models, tmp_path):
    kill_at_random_times(models, tmp_path, count=6)


@pytest.mark.slow
def test_many_saves_killed_at_random_times_leave_the_old_or_the_new_checkpoint(models, tmp_path):
    kill_at_random_times(models, tmp_path, count=60)


@pytest.mark.parametrize(
    ("stored_as", "message"),
    [
        ("bogus", r"format: Input should be 'dense'"),
        ("mixed-precision", "Value error, mixed-precision cannot be set"),
        ("marlin-24", "format 'marlin-24' is not one layers are stored in"),
        ("float-quantized", "format 'float-quantized' does not store the group's scheme"),
        ("int-quantized", "format 'int-quantized' does not store the group's scheme"),
    ],
)
def test_a_group_format_that_does_not_store_its_scheme_is_refused(
    stored_as, message, saved, tmp_path
):
    path = copy_of(saved, "W4A16", tmp_path)

    def change(config: dict) -> None:
        config["quantization_config"]["config_groups"]["group_0"]["format"] = stored_as

    edit_config(path, change)
    with pytest.raises(ExportError, match=rf"config\.json: .*config_groups\.group_0\W+{message}"):
        load_compressed(path)
