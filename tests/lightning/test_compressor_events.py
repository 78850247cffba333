"""The Compressor turns Lightning hooks into exactly the documented event sequences."""

from __future__ import annotations

import pytest
import torch
from helpers import RecordingModifier
from lightning.pytorch import Trainer
from lightning.pytorch.plugins import MixedPrecision
from lightning_models import Regressor, TwoOptimizerRegressor, regression_loader

from lightning_compress import Compressor
from lightning_compress.core import EventType
from lightning_compress.recipe import RecipeError

B, L, PRE, POST, E = (
    EventType.BATCH_START,
    EventType.LOSS_CALCULATED,
    EventType.OPTIM_PRE_STEP,
    EventType.OPTIM_POST_STEP,
    EventType.BATCH_END,
)


def fit(model, compressor, **trainer_kwargs) -> RecordingModifier:
    defaults = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer = Trainer(callbacks=[compressor], **{**defaults, **trainer_kwargs})
    trainer.fit(model, regression_loader(), regression_loader(8))
    (modifier,) = compressor.session.lifecycle.recipe.modifiers
    return modifier


def events(modifier: RecordingModifier) -> list[tuple[EventType, int]]:
    return [(call[1], call[2]) for call in modifier.names("event")]


def test_plain_training_emits_one_step_per_batch():
    compressor = Compressor(RecordingModifier(start=0))
    modifier = fit(Regressor(), compressor, max_steps=3)
    # BATCH_END comes after the optimizer step, so it already counts that step.
    expected = [(t, step + (t == E)) for step in range(3) for t in (B, L, PRE, POST, E)]
    assert events(modifier) == expected
    state = compressor.session.state
    assert (state.steps_per_epoch, state.batches_per_step) == (8, 1)
    assert modifier.finalized_ and [c[0] for c in modifier.calls][-1] == "finalize"


def test_gradient_accumulation_steps_once_per_accumulated_batches():
    compressor = Compressor(RecordingModifier(start=0))
    modifier = fit(Regressor(), compressor, max_steps=2, accumulate_grad_batches=2)
    expected = [(B, 0), (L, 0), (E, 0), (B, 0), (L, 0), (PRE, 0), (POST, 0), (E, 1)]
    expected += [(B, 1), (L, 1), (E, 1), (B, 1), (L, 1), (PRE, 1), (POST, 1), (E, 2)]
    assert events(modifier) == expected
    state = compressor.session.state
    assert (state.steps_per_epoch, state.batches_per_step) == (4, 2)
    batches = [call[3] for call in modifier.names("event")]
    assert batches[0] == 0


def fp16_with_scaler() -> MixedPrecision:
    """fp16 AMP with a GradScaler on CPU (``precision="16-mixed"`` alone falls back to bf16)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_and_clipping(precision):
    compressor = Compressor(RecordingModifier(start=0))
    settings = {"plugins": [fp16_with_scaler()]} if precision == "16-mixed" else {}
    settings = settings or {"precision": precision}
    modifier = fit(Regressor(), compressor, max_steps=2, gradient_clip_val=0.5, **settings)
    kinds = [event for event, _ in events(modifier)]
    assert kinds == [B, L, PRE, POST, E] * 2


def test_amp_skipped_step_emits_no_post_step():
    class Exploding(Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 0 else loss

    compressor = Compressor(RecordingModifier(start=0))
    modifier = fit(Exploding(), compressor, max_steps=2, plugins=[fp16_with_scaler()])
    kinds = [event for event, _ in events(modifier)]
    assert kinds[:5] == [B, L, PRE, E, B]
    assert kinds.count(POST) == kinds.count(PRE) - 1


def test_manual_optimization_with_two_optimizers():
    compressor = Compressor(RecordingModifier(start=0))
    modifier = fit(TwoOptimizerRegressor(), compressor, max_steps=4)
    assert events(modifier) == [
        (B, 0),
        (L, 0),
        (PRE, 0),
        (POST, 0),
        (L, 1),
        (PRE, 1),
        (POST, 1),
        (E, 2),
        (B, 2),
        (L, 2),
        (PRE, 2),
        (POST, 2),
        (L, 3),
        (PRE, 3),
        (POST, 3),
        (E, 4),
    ]
    assert compressor.session.state.steps_per_epoch == 16
    assert isinstance(compressor.session.state.optimizer, list)


def test_max_epochs_with_validation_in_between():
    compressor = Compressor(RecordingModifier(start=0.5, end=1.5))
    modifier = fit(Regressor(), compressor, max_epochs=2, limit_val_batches=2, val_check_interval=4)
    received = events(modifier)
    assert len(received) == 2 * 8 * 5
    assert [step for event, step in received if event == B] == list(range(16))
    (start,) = modifier.names("start")
    (end,) = modifier.names("end")
    assert (start[2], end[2]) == (4, 12)


def test_one_shot_only_recipe_is_refused_before_training():
    model = Regressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressor = Compressor(RecordingModifier(start=-1))
    trainer = Trainer(
        callbacks=[compressor],
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
    )
    with pytest.raises(RecipeError, match="all one-shot.*oneshot"):
        trainer.fit(model, regression_loader())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failure_in_training_removes_hooks():
    compressor = Compressor(RecordingModifier(start=0, fail_on="update"))
    model = Regressor()
    trainer = Trainer(
        callbacks=[compressor],
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
    )
    with pytest.raises(RuntimeError, match="injected"):
        trainer.fit(model, regression_loader())
    assert not any(m._forward_hooks for m in model.modules())
    assert compressor._optimizer_hooks == []
