"""A LightningModule and DataModule for causal language models (the bundled one by default)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity

from lightning_compress.bundled import (
    bundled_text,
    causal_lm_logits,
    load_bundled_model,
    load_tokenizer,
    token_windows,
)
from lightning_compress.lightning.compressor import check_compressor_resume

__all__ = ["BundledTextDataModule", "CausalLMModule", "causal_lm_logits"]


class CausalLMModule(pl.LightningModule):
    """Next-token training of a causal LM, with validation perplexity.

    Args:
        model: the language model; the bundled tiny decoder when None.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        tokenizer: the model's tokenizer, saved with it by ``Compressor(save_dir=...)``; the
            bundled ``ByteTokenizer`` when ``model`` is None.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        tokenizer: Any | None = None,
    ):
        super().__init__()
        if model is None:
            model = load_bundled_model().train()
            tokenizer = load_tokenizer() if tokenizer is None else tokenizer
        self.model = model
        self.tokenizer = tokenizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_perplexity = Perplexity()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return causal_lm_logits(self.model, input_ids)

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        return loss, logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.val_perplexity.update(logits.float(), batch[:, 1:])
        self.log("val_loss", loss)
        self.log("val_perplexity", self.val_perplexity, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compressor_resume(self.trainer, checkpoint)


class BundledTextDataModule(pl.LightningDataModule):
    """Windows of the bundled text: training from its first 90%, validation from the rest.

    Args:
        seq_len: tokens per window.
        batch_size: windows per batch.
        train_windows: training windows (consecutive, from the start of the text).
        val_windows: validation windows.
    """

    def __init__(
        self,
        seq_len: int = 256,
        batch_size: int = 8,
        train_windows: int = 256,
        val_windows: int = 16,
    ):
        super().__init__()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_windows = train_windows
        self.val_windows = val_windows
        self.tokenizer = load_tokenizer()

    def setup(self, stage: str) -> None:
        self.train_data = token_windows(
            bundled_text("calibration"), self.tokenizer, self.seq_len, self.train_windows
        )
        self.val_data = token_windows(
            bundled_text("evaluation"), self.tokenizer, self.seq_len, self.val_windows
        )

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.train_data, self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, self.batch_size)
