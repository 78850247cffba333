"""The bundled TinyDecoder is exported as the Llama checkpoint it equals, with its tokenizer."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lightning_compress.bundled import ByteTokenizer, TinyDecoder, TinyDecoderConfig
from lightning_compress.export import save_compressed
from lightning_compress.lightning.oneshot import oneshot

TEXT = "Anne Elliot, “Persuasion” — naïve café ✓\n"


def test_tiny_decoder_loads_as_llama_with_the_same_logits_and_tokens(w4a16, tmp_path):
    torch.manual_seed(0)
    config = TinyDecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, max_seq_len=64)
    model = TinyDecoder(config).eval()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    oneshot(model, [w4a16()], ids, num_calibration_samples=4, trainer_kwargs={"logger": False})
    path = save_compressed(model, tmp_path / "tiny", tokenizer=ByteTokenizer())

    saved = json.loads((path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"]
    assert saved["quantization_config"]["format"] == "pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(loaded, LlamaForCausalLM)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer(TEXT)["input_ids"] == ByteTokenizer().encode(TEXT)
    assert tokenizer.decode(ByteTokenizer().encode(TEXT)) == TEXT
    probe = torch.tensor([ByteTokenizer().encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe).logits, model(probe), rtol=1e-5, atol=1e-5)
