"""Tests for the bundled tiny Llama-style model, its tokenizer, data helpers and evaluation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lightning_compress.bundled import (
    ByteTokenizer,
    DecoderLayer,
    RMSNorm,
    TinyDecoder,
    TinyDecoderConfig,
    bundled_text,
    load_bundled_model,
    load_tokenizer,
    perplexity,
    split_text,
    token_windows,
)
from lightning_compress.bundled.loading import CHECKPOINT_NAME, DATA_DIR, TEXT_NAME

# The committed checkpoint scores 3.79 on the first 4 evaluation windows; allow 1.5x that.
PERPLEXITY_BOUND = 5.7

SMALL = TinyDecoderConfig(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


@pytest.fixture(scope="module")
def bundled_model() -> TinyDecoder:
    return load_bundled_model()


def small_model() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder(SMALL).eval()


@pytest.mark.parametrize("text", ["", "Hello, world!\n", "naïve café — 東京 🚀"])
def test_tokenizer_round_trip(text: str) -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_tokenizer_call_and_invalid_bytes() -> None:
    tokenizer = load_tokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer("hi") == {"input_ids": [104, 105]}
    assert torch.equal(
        tokenizer("hi", return_tensors="pt")["input_ids"], torch.tensor([[104, 105]])
    )
    assert tokenizer.decode([0xFF]) == "\ufffd"
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer("hi", return_tensors="np")


def test_config_round_trip() -> None:
    config = TinyDecoderConfig(num_layers=2)
    assert TinyDecoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        TinyDecoderConfig.from_dict({"bogus": 1})


def test_llama_module_names() -> None:
    model = small_model()
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert isinstance(model.model.norm, RMSNorm)
    assert isinstance(model.lm_head, torch.nn.Linear)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    layer = model.model.layers[0]
    assert isinstance(layer, DecoderLayer)
    names = {name for name, _ in layer.named_modules()}
    expected = {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"}
    expected |= {f"self_attn.{p}_proj" for p in "qkvo"}
    expected |= {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert expected <= names


def test_forward_shapes() -> None:
    model = small_model()
    logits = model(torch.randint(0, 256, (3, 17)))
    assert logits.shape == (3, 17, SMALL.vocab_size)
    layer = model.model.layers[0]
    hidden = torch.randn(3, 17, SMALL.hidden_size)
    assert layer(hidden).shape == hidden.shape
    positions = torch.arange(17).expand(3, 17)
    assert torch.allclose(layer(hidden, position_ids=positions), layer(hidden), atol=1e-6)


def test_gqa_projection_shapes() -> None:
    attn = small_model().model.layers[0].self_attn
    head_dim = SMALL.hidden_size // SMALL.num_heads
    assert attn.q_proj.weight.shape == (SMALL.hidden_size, SMALL.hidden_size)
    assert attn.k_proj.weight.shape == (SMALL.num_kv_heads * head_dim, SMALL.hidden_size)
    assert attn.v_proj.weight.shape == (SMALL.num_kv_heads * head_dim, SMALL.hidden_size)
    assert attn.o_proj.weight.shape == (SMALL.hidden_size, SMALL.hidden_size)
    assert all(m.bias is None for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))


def test_causality() -> None:
    model = small_model()
    ids = torch.randint(0, 256, (2, 12))
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 256
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.allclose(before[:, :8], after[:, :8], atol=1e-6)
    assert not torch.allclose(before[:, 8:], after[:, 8:], atol=1e-6)


def test_padding_mask() -> None:
    model = small_model()
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first sequence
    with torch.no_grad():
        unmasked = model(ids)
        masked = model(ids, attention_mask=mask)
        all_ones = model(ids, attention_mask=torch.ones_like(ids))
    assert torch.isfinite(masked).all()
    assert torch.allclose(all_ones, unmasked, atol=1e-5)
    assert torch.allclose(masked[1], unmasked[1], atol=1e-5)
    assert not torch.allclose(masked[0, 3:], unmasked[0, 3:], atol=1e-4)
    # Masked positions are ignored: changing padded tokens does not affect the real ones.
    repadded = ids.clone()
    repadded[0, :3] = (repadded[0, :3] + 7) % 256
    with torch.no_grad():
        masked_again = model(repadded, attention_mask=mask)
    assert torch.allclose(masked_again[0, 3:], masked[0, 3:], atol=1e-5)


def test_split_text() -> None:
    text = "aaaa\nbbbb\ncccc\ndddd\n"
    head, tail = split_text(text, fraction=0.6)
    assert head + tail == text
    assert head == "aaaa\nbbbb\n"
    assert split_text("abcdefghij", fraction=0.5) == ("abcde", "fghij")


def test_bundled_text_splits() -> None:
    calibration = bundled_text("calibration")
    evaluation = bundled_text("evaluation")
    full = (DATA_DIR / TEXT_NAME).read_text(encoding="utf-8")
    assert calibration + evaluation == full
    assert calibration.endswith("\n")
    assert 0.89 < len(calibration) / len(full) <= 0.9
    with pytest.raises(ValueError, match=r"'train'.*calibration.*evaluation"):
        bundled_text("train")


def test_token_windows() -> None:
    tokenizer = ByteTokenizer()
    windows = token_windows("abcdefghij", tokenizer, seq_len=3, num_windows=2)
    assert windows.dtype == torch.long
    assert windows.tolist() == [list(b"abc"), list(b"def")]
    assert token_windows("abcdefghij", tokenizer, seq_len=3).shape == (3, 3)
    with pytest.raises(ValueError, match="enough for 3 windows"):
        token_windows("abcdefghij", tokenizer, seq_len=3, num_windows=4)


def test_perplexity_restores_training_mode() -> None:
    model = small_model()
    windows = torch.randint(0, 256, (3, 9))
    model.train()
    value = perplexity(model, windows, batch_size=2)
    assert model.training
    model.eval()
    assert perplexity(model, windows) == pytest.approx(value, rel=1e-5)
    assert not model.training
    # An untrained model with small random weights is close to uniform over the vocabulary.
    assert 200 < value < 320


def test_checkpoint_is_float16_and_loads_strictly(bundled_model: TinyDecoder) -> None:
    state = load_file(DATA_DIR / CHECKPOINT_NAME)
    assert {t.dtype for t in state.values()} == {torch.float16}
    assert set(state) == set(bundled_model.state_dict())
    assert not bundled_model.training
    assert {p.dtype for p in bundled_model.parameters()} == {torch.float32}
    assert load_bundled_model(dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_bundled_model_held_out_perplexity(bundled_model: TinyDecoder) -> None:
    windows = token_windows(bundled_text("evaluation"), load_tokenizer(), 256, 4)
    value = perplexity(bundled_model, windows)
    assert 1.0 < value < PERPLEXITY_BOUND
