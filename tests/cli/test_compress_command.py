"""``lightning-compress compress`` on a local transformers checkpoint and data files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from cli_checkpoints import RECORDS, save_checkpoint
from helpers import int8_channel_groups
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_compress.bundled import perplexity
from lightning_compress.cli import main
from lightning_compress.evaluate import evaluation_samples
from lightning_compress.lightning.compress_command import run_compress
from lightning_compress.pretrained import load_pretrained
from lightning_compress.recipe import RecipeError

CONFIGS = Path(__file__).parents[2] / "configs" / "compress"
GPTQ = {
    "quant_stage": {
        "quant_modifiers": {
            "GPTQModifier": {
                "ignore": ["lm_head"],
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
                    }
                },
            }
        }
    }
}
RTN = {
    "quant_modifiers": {
        "QuantizationModifier": {"config_groups": int8_channel_groups(), "ignore": ["lm_head"]}
    }
}
QUIET = ["--trainer.enable_progress_bar", "false"]


def printed_perplexities(out: str) -> tuple[float, float]:
    match = re.search(r"Perplexity on .*: ([\d.]+) before compression, ([\d.]+) after", out)
    assert match is not None, out
    return float(match[1]), float(match[2])


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "gptq.yaml"
    path.write_text(yaml.safe_dump(GPTQ))
    return path


def flags(checkpoint, recipe, data, eval_data, output_dir) -> list[str]:
    return [
        "--model",
        str(checkpoint),
        "--recipe",
        str(recipe),
        "--dataset",
        str(data),
        "--num_calibration_samples",
        "4",
        "--max_seq_length",
        "32",
        "--eval_dataset",
        str(eval_data),
        "--output_dir",
        str(output_dir),
        *QUIET,
    ]


def test_compress_takes_a_local_checkpoint_and_a_jsonl_dataset(
    checkpoint, recipe, jsonl, tmp_path, capsys
):
    data, eval_data = jsonl("calibration.jsonl"), jsonl("eval.jsonl", RECORDS[::-1])
    main(["compress", *flags(checkpoint, recipe, data, eval_data, tmp_path / "out")])
    before, after = printed_perplexities(capsys.readouterr().out)

    original, tokenizer = load_pretrained(checkpoint)
    windows = evaluation_samples(eval_data, tokenizer, original, 32)
    assert before == pytest.approx(perplexity(original, windows), rel=1e-3)
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert after == pytest.approx(perplexity(compressed, windows), rel=1e-3)
    assert before != after
    weight = compressed.model.layers[0].mlp.down_proj.weight
    assert weight.unique().numel() < weight.numel()  # quantized: few distinct values per group


def test_the_summary_holds_the_perplexities_and_every_phase(
    checkpoint, recipe, jsonl, tmp_path, capsys
):
    data, eval_data = jsonl("calibration.jsonl"), jsonl("eval.jsonl", RECORDS[::-1])
    main(["compress", *flags(checkpoint, recipe, data, eval_data, tmp_path / "out")])
    captured = capsys.readouterr()
    before, after = printed_perplexities(captured.out)
    output = captured.out + captured.err
    summary = output[output.index("compression summary:") :]
    change = f"{(after - before) / before:+.1%}"
    assert "perplexity on " in summary and f"-> {after:.4g} after ({change})" in summary
    assert f"{before:.4g} before" in summary
    phases = re.search(r"time: (.*) \(total", summary)[1]
    assert [phase.split()[0] for phase in phases.split(", ")] == [
        "load",
        "evaluate",
        "data",
        "compress",
        "save",
    ]


def test_the_same_keys_work_in_a_yaml_config(checkpoint, recipe, jsonl, tmp_path, capsys):
    data, eval_data = jsonl("calibration.jsonl"), jsonl("eval.jsonl", RECORDS[::-1])
    main(["compress", *flags(checkpoint, recipe, data, eval_data, tmp_path / "by-flags")])
    by_flags = printed_perplexities(capsys.readouterr().out)
    config = {
        "model": str(checkpoint),
        "recipe": GPTQ,
        "dataset": str(data),
        "num_calibration_samples": 4,
        "max_seq_length": 32,
        "eval_dataset": str(eval_data),
        "output_dir": str(tmp_path / "by-config"),
        "trainer": {"enable_progress_bar": False},
    }
    (tmp_path / "compress.yaml").write_text(yaml.safe_dump(config))
    main(["compress", "--config", str(tmp_path / "compress.yaml")])
    assert printed_perplexities(capsys.readouterr().out) == by_flags
    saved = load_file(tmp_path / "by-flags" / "model.safetensors")
    again = load_file(tmp_path / "by-config" / "model.safetensors")
    assert saved.keys() == again.keys()
    assert all(torch.equal(saved[key], again[key]) for key in saved)


def test_the_calibration_data_is_the_file(checkpoint, recipe, jsonl, tmp_path):
    """Two different files calibrate GPTQ differently; the same file twice, identically."""
    other = jsonl("other.jsonl", [text.upper() for text in RECORDS])
    runs = {}
    for name, data in (("a", jsonl()), ("b", jsonl("b.jsonl")), ("other", other)):
        argv = ["--model", str(checkpoint), "--recipe", str(recipe), "--dataset", str(data)]
        model = run_compress([*argv, "--num_calibration_samples", "4", "--max_seq_length", "32"])
        runs[name] = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    assert torch.equal(runs["a"], runs["b"])
    assert not torch.equal(runs["a"], runs["other"])


def test_a_missing_dataset_file_is_refused_naming_it(checkpoint, recipe, tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        run_compress(
            ["--model", str(checkpoint), "--recipe", str(recipe), "--dataset", str(missing)]
        )


def test_the_checkpoint_dtype_is_kept_unless_dtype_is_given(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "bf16", torch.bfloat16)
    recipe = ["--recipe", yaml.safe_dump(RTN)]
    kept = run_compress(["--model", str(checkpoint), *recipe])
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    chosen = run_compress(["--model", str(checkpoint), "--dtype", "float32", *recipe])
    assert {p.dtype for p in chosen.parameters()} == {torch.float32}


def test_a_model_that_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model: .* expected a transformers checkpoint"):
        run_compress(["--model", str(tmp_path), "--recipe", yaml.safe_dump(RTN)])


def test_strict_refuses_a_recipe_that_leaves_weights_out_before_compressing(checkpoint, capsys):
    rtn = {
        "config_groups": int8_channel_groups([r"re:.*self_attn\..*_proj"]),
        "ignore": ["lm_head"],
    }
    attention_only = {"quant_modifiers": {"QuantizationModifier": rtn}}
    argv = ["--model", str(checkpoint), "--recipe", yaml.safe_dump(attention_only), *QUIET]
    with pytest.raises(RecipeError, match=r"strict: .*mlp\.down_proj\.weight x2"):
        run_compress([*argv, "--strict"])
    capsys.readouterr()
    run_compress(argv)  # without --strict: a warning, printed with the library's log
    assert "WARNING: 6 weight tensors of the decoder blocks" in capsys.readouterr().out


def test_trainer_options_given_reach_oneshot_and_the_others_keep_its_defaults(
    checkpoint, monkeypatch
):
    calls = []
    monkeypatch.setattr(
        "lightning_compress.lightning.compress_command.oneshot",
        lambda model, recipe, dataset, **kwargs: calls.append(kwargs),
    )
    argv = ["--model", str(checkpoint), "--recipe", yaml.safe_dump(RTN)]
    run_compress(argv)
    run_compress([*argv, "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed"])
    assert calls[0]["trainer_kwargs"] == {}
    assert calls[1]["trainer_kwargs"] == {"accelerator": "cpu", "precision": "bf16-mixed"}


def test_a_shipped_config_runs_on_a_checkpoint_given_by_flag(checkpoint, jsonl, capsys):
    shipped = CONFIGS / "gptq_w4a16_bundled.yaml"
    data = jsonl(texts=RECORDS * 8)  # 32 windows of 32 tokens: the config's sample count
    argv = ["--config", str(shipped), "--model", str(checkpoint), "--dataset", str(data)]
    model = run_compress([*argv, "--eval_dataset", str(data), "--max_seq_length", "32", *QUIET])
    assert type(model).__name__ == "LlamaForCausalLM"
    before, after = printed_perplexities(capsys.readouterr().out)
    assert before != after
