"""A LightningModule and DataModule for causal language models (the bundled one by default)."""

from __future__ import annotations

import os
from collections.abc import Mapping
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
from lightning_compress.lightning.compressor import check_compressor_resume, compression_loss
from lightning_compress.modifiers.quantization.learnable import learned_scale_parameters

__all__ = [
    "IGNORE_INDEX",
    "BundledTextDataModule",
    "CausalLMModule",
    "causal_lm_logits",
    "causal_lm_loss",
    "next_token_targets",
]

IGNORE_INDEX = -100
"""Target of a position whose predicted token is padding (not scored)."""


class CausalLMModule(pl.LightningModule):
    """Next-token training of a causal LM, with validation perplexity.

    The training loss goes through ``compression_loss``, so a ``Compressor``'s distillation
    modifiers add their term without a subclass.

    Batches are token tensors ``[batch, seq]`` or mappings with ``input_ids`` and, for padded
    samples, an ``attention_mask`` (positions it marks 0 are neither attended to by a Hugging
    Face model nor scored).

    Args:
        model: the language model, a Hugging Face model directory (loaded with
            ``AutoModelForCausalLM.from_pretrained``), or None for the bundled tiny decoder.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        tokenizer: the model's tokenizer, saved with it by ``Compressor(save_dir=...)``; the
            bundled ``ByteTokenizer`` when ``model`` is None, the directory's tokenizer when
            ``model`` is a directory.
        warmup_steps: optimizer steps over which the learning rate rises linearly from
            ``lr / warmup_steps`` to ``lr`` (0: constant ``lr``).
        gradient_checkpointing: recompute each decoder layer's activations in the backward
            pass instead of keeping them (transformers' activation checkpointing).
        scale_lr: learning rate of the weight scales that quantization-aware training with
            ``learnable_scales`` learns; they form their own AdamW parameter group, without
            weight decay (decay would pull every scale towards 0). None: ``lr``, which under
            Adam moves a scale by a large fraction of itself per step: prefer about a tenth
            of the scales' size (see ``lightning_compress.modifiers.quantization.learnable``).

    Raises:
        ValueError: for a negative ``warmup_steps``, a ``scale_lr`` that is not positive, or
            ``gradient_checkpointing`` on a model that does not support it.
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        tokenizer: Any | None = None,
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        scale_lr: float | None = None,
    ):
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {warmup_steps}")
        if scale_lr is not None and not scale_lr > 0:
            raise ValueError(f"scale_lr: expected a positive float or None, got {scale_lr}")
        if model is None:
            model = load_bundled_model().train()
            tokenizer = load_tokenizer() if tokenizer is None else tokenizer
        elif isinstance(model, (str, os.PathLike)):
            model, tokenizer = _from_pretrained(model, tokenizer)
        if gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        self.model = model
        self.tokenizer = tokenizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.scale_lr = scale_lr
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if attention_mask is None:
            return causal_lm_logits(self.model, input_ids)
        output = self.model(input_ids, attention_mask=attention_mask)
        return output if isinstance(output, torch.Tensor) else output.logits

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = _batch_tokens(batch)
        inputs_mask = None if attention_mask is None else attention_mask[:, :-1]
        logits = self(input_ids[:, :-1], inputs_mask)
        targets = next_token_targets(input_ids, attention_mask)
        return causal_lm_loss(logits, targets), logits, targets

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss(batch)
        loss = compression_loss(self, loss)  # a Compressor's distillation adds its term
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, logits, targets = self._loss(batch)
        self.val_perplexity.update(logits.float(), targets)
        self.log("val_loss", loss)
        self.log("val_perplexity", self.val_perplexity, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameter_groups(), lr=self.lr, weight_decay=self.weight_decay
        )
        if not self.warmup_steps:
            return optimizer
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the model's parameters, then (when quantization-
        aware training learns them) the weight scales at ``scale_lr`` without weight decay.

        Returns:
            One group, or two when there are learned scales.
        """
        scales = learned_scale_parameters(self)
        learned = {id(scale) for scale in scales}
        groups = [{"params": [p for p in self.parameters() if id(p) not in learned]}]
        if scales:
            lr = self.lr if self.scale_lr is None else self.scale_lr
            groups.append({"params": scales, "lr": lr, "weight_decay": 0.0})
        return groups

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_compressor_resume(self.trainer, checkpoint)


def next_token_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The token each position predicts: ``input_ids`` shifted left by one.

    Args:
        input_ids: token ids ``[batch, seq]``.
        attention_mask: 1 for real tokens, 0 for padding, ``[batch, seq]``; None: all real.

    Returns:
        Targets ``[batch, seq - 1]``, :data:`IGNORE_INDEX` where the predicted token is padding.
    """
    targets = input_ids[:, 1:]
    if attention_mask is None:
        return targets
    return targets.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions that have a target.

    Args:
        logits: the model's logits for all but the last token, ``[batch, seq - 1, vocab]``.
        targets: :func:`next_token_targets` ``[batch, seq - 1]``.

    Returns:
        The loss (a scalar, in float32 for low-precision logits).

    Raises:
        ValueError: when no position has a target (every predicted token is padding).
    """
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError("attention_mask: the batch has no token to predict (all padding)")
    return nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


def _batch_tokens(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` and ``attention_mask`` (or None) of a tensor or mapping batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask")
    raise TypeError(
        "batch: expected a token tensor [batch, seq] or a mapping with 'input_ids' (and "
        f"optionally 'attention_mask'), got {type(batch).__name__}"
    )


def _from_pretrained(path: str | os.PathLike, tokenizer: Any | None) -> tuple[nn.Module, Any]:
    """A Hugging Face causal LM (in training mode) and its tokenizer from a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).train()
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):  # a directory with weights only
            tokenizer = None
    return model, tokenizer


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (it composes with the hooks and
    parametrizations that compression adds)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} does not support it (expected a "
            "Hugging Face model with supports_gradient_checkpointing)"
        )
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:  # transformers before 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        enable(activation_checkpointing_kwargs=kwargs)


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
