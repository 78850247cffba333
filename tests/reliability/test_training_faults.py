"""Training-aware compression under faults: schedules that end with training, and runs killed
at random points then resumed from their last checkpoint, compared to uninterrupted runs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import Regressor
from loguru import logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import Compressor, compression_loss
from lightning_compress.lightning import check_compressor_resume
from lightning_compress.modifiers import (
    ConstantPruningModifier,
    MagnitudePruningModifier,
    OutputDistillationModifier,
    QuantizationModifier,
)
from lightning_compress.recipe import RecipeError

SAMPLES, BATCH = 64, 8  # 8 batches per epoch


class InjectedFault(RuntimeError):
    """The failure a test injects into a run."""


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint: it restarts mid-epoch where it stopped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:
                self._yielded += 1
                yield batch
        self._yielded = 0

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["batches"] % len(self)


def training_data(resumable: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 16, generator=generator)
    y = x @ torch.randn(16, 4, generator=generator)
    loader = ResumableLoader if resumable else DataLoader
    return loader(TensorDataset(x, y), batch_size=BATCH)


class FailAt(Callback):
    """Raises ``InjectedFault`` in ``hook`` once ``step`` optimizer steps are done."""

    def __init__(self, step: int, hook: str) -> None:
        self.step = step
        setattr(self, hook, self._maybe_fail)

    def _maybe_fail(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise InjectedFault(f"injected at step {self.step}")


class DistilledRegressor(Regressor):
    """The regressor with the one line that lets distillation modifiers change its loss."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return compression_loss(self, torch.nn.functional.mse_loss(self(x), y))


def teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


class DataRecorder(Callback):
    """Records the first value of each training batch with the step it is used at."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, float(batch[0][0, 0])))


def train(
    recipe: Any,
    out: Path | None = None,
    *,
    max_epochs: int = 3,
    max_steps: int = -1,
    accumulate: int = 1,
    fault: Callback | None = None,
    resume: bool = False,
    resumable: bool = True,
    recorder: DataRecorder | None = None,
) -> dict[str, torch.Tensor]:
    """Trains the regressor with ``recipe``; checkpoints every step into ``out``.

    Returns:
        The final state dict (after the Compressor finalized).
    """
    callbacks: list[Callback] = [fault] if fault is not None else []
    callbacks += [Compressor(recipe, teacher=teacher()), *([recorder] if recorder else [])]
    if out is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True, save_top_k=0)
        )
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=out is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = DistilledRegressor(optimizer="adam")
    ckpt = str(out / "last.ckpt") if resume else None
    trainer.fit(model, training_data(resumable), ckpt_path=ckpt)
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def interrupted_then_resumed(recipe: Any, out: Path, step: int, hook: str, **kw: Any) -> dict:
    with pytest.raises(InjectedFault):
        train(recipe, out, fault=FailAt(step, hook), **kw)
    assert (out / "last.ckpt").exists()
    return train(recipe, out, resume=True, **kw)


def assert_same_result(expected: dict, actual: dict) -> None:
    """Same keys, identical pruning masks (zeros), weights equal up to float tolerance."""
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.equal(value == 0, actual[key] == 0), f"{key}: masks differ"
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(actual[key], value), key


def sparsity(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


# ---------------------------------------------------------------- schedules ending with training
@pytest.mark.parametrize(
    ("update", "final", "accumulate"),
    [(1.0, 0.5, 1), (0.5, 0.5, 1), (None, 0.8, 1), (0.25, 0.8, 2), (None, 0.8, 3)],
)
def test_a_pruning_schedule_ending_with_training_reaches_its_final_sparsity(
    update, final, accumulate
):
    recipe = MagnitudePruningModifier(
        targets=["fc1", "fc2"], final_sparsity=final, start=0, end=1, update=update
    )
    state = train(recipe, max_epochs=1, accumulate=accumulate)
    for key in ("fc1.weight", "fc2.weight"):
        pruned = int((state[key] == 0).sum())
        assert pruned == round(final * state[key].numel()), (key, sparsity(state[key]))


def test_a_pruning_schedule_ending_at_max_steps_reaches_its_final_sparsity():
    modifier = MagnitudePruningModifier(
        targets=["fc1", "fc2"], final_sparsity=0.5, start=0, end=0.5
    )
    state = train(modifier, max_steps=4)  # 8 steps per epoch: end is the last step
    for key in ("fc1.weight", "fc2.weight"):
        assert int((state[key] == 0).sum()) == round(0.5 * state[key].numel()), key


def test_a_pruning_schedule_cut_by_max_steps_holds_the_target_of_the_last_step():
    modifier = MagnitudePruningModifier(
        targets=["fc1", "fc2"], final_sparsity=0.8, start=0, end=2, inter_func="linear"
    )
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        state = train(modifier, max_steps=5)  # 8 steps per epoch: the run stops at index 5/8
    finally:
        logger.remove(sink)
    assert any("before end=2 of the schedule" in message for message in messages)
    due = modifier.target_sparsity(5 / 8)
    assert due > modifier.target_sparsity(4 / 8)
    weight = state["fc1.weight"]
    assert int((weight == 0).sum()) == round(due * weight.numel())


# ----------------------------------------------------------------------------- resume is exact
PRUNING_WITH_QAT = """
prune_stage:
  pruning_modifiers:
    MagnitudePruningModifier:
      targets: [fc1, fc2]
      final_sparsity: 0.8
      start: 0
      end: 2
      update: 0.25
  quant_modifiers:
    QuantizationModifier:
      start: 0.5
      end: 2.5
      config_groups:
        g: {targets: [Linear], weights: {num_bits: 2, strategy: channel}}
"""


def test_resume_at_a_pruning_update_while_qat_is_active_gives_the_uninterrupted_masks(tmp_path):
    whole = train(PRUNING_WITH_QAT)
    # Step 6 is a pruning update (every 2 steps), with QAT active since step 4.
    resumed = interrupted_then_resumed(PRUNING_WITH_QAT, tmp_path, 6, "on_train_batch_start")
    assert_same_result(whole, resumed)


def test_mid_epoch_resume_with_a_resumable_loader_sees_the_same_batches(tmp_path):
    whole_data, resumed_data = DataRecorder(), DataRecorder()
    whole = train(PRUNING_WITH_QAT, recorder=whole_data)
    with pytest.raises(InjectedFault):
        train(PRUNING_WITH_QAT, tmp_path, fault=FailAt(11, "on_train_batch_start"))
    resumed = train(PRUNING_WITH_QAT, tmp_path, resume=True, recorder=resumed_data)
    assert resumed_data.seen == whole_data.seen[11:]
    assert_same_result(whole, resumed)


def test_mid_epoch_resume_with_a_plain_loader_warns_that_it_is_not_exact(tmp_path):
    messages: list[str] = []
    with pytest.raises(InjectedFault):
        train(PRUNING_WITH_QAT, tmp_path, fault=FailAt(11, "on_train_batch_start"), resumable=False)
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        train(PRUNING_WITH_QAT, tmp_path, resume=True, resumable=False)
    finally:
        logger.remove(sink)
    assert any("not exact" in message and "state_dict" in message for message in messages)


def test_resume_at_an_epoch_boundary_with_a_plain_loader_is_exact_and_silent(tmp_path):
    messages: list[str] = []
    whole = train(PRUNING_WITH_QAT, resumable=False)
    with pytest.raises(InjectedFault):
        train(PRUNING_WITH_QAT, tmp_path, fault=FailAt(8, "on_train_batch_start"), resumable=False)
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        resumed = train(PRUNING_WITH_QAT, tmp_path, resume=True, resumable=False)
    finally:
        logger.remove(sink)
    assert not [message for message in messages if "not exact" in message]
    assert_same_result(whole, resumed)


# ---------------------------------------------------------------- random kill points, fixed seed
def constant_pruning_qat_and_distillation() -> list:
    return [
        MagnitudePruningModifier(targets=["fc1"], final_sparsity=0.6, start=0, end=1, update=0.5),
        ConstantPruningModifier(targets=["fc2"], start=0),
        QuantizationModifier(scheme="W8A8", targets=["Linear"], start=1, freeze_observers=2),
        OutputDistillationModifier(comparison="mse", start=0.5, end=2),
    ]


RECIPES = {
    "gradual_pruning_with_qat": lambda: PRUNING_WITH_QAT,
    "mixed": constant_pruning_qat_and_distillation,
}
HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
TOTAL_STEPS = 3 * SAMPLES // BATCH


def kill_points(count: int, seed: int) -> list[tuple[str, int, str]]:
    """(recipe, step, hook) cases; from step 2, so that a checkpoint exists to resume from."""
    rng = random.Random(seed)
    return [
        (rng.choice(sorted(RECIPES)), rng.randrange(2, TOTAL_STEPS), rng.choice(HOOKS))
        for _ in range(count)
    ]


def test_resume_where_a_modifier_ended_does_not_run_it_again(tmp_path):
    # Distillation ends at index 2 (step 16): before, the resumed run started it again at its
    # first batch and distilled one more step than an uninterrupted run.
    recipe = constant_pruning_qat_and_distillation
    whole = train(recipe())
    resumed = interrupted_then_resumed(recipe(), tmp_path, 16, "on_train_batch_start")
    assert_same_result(whole, resumed)


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, dict]:
    return {name: train(make()) for name, make in RECIPES.items()}


@pytest.mark.parametrize(("recipe", "step", "hook"), kill_points(6, seed=15))
def test_a_run_killed_at_a_random_point_resumes_like_an_uninterrupted_one(
    tmp_path, uninterrupted, recipe, step, hook
):
    resumed = interrupted_then_resumed(RECIPES[recipe](), tmp_path, step, hook)
    assert_same_result(uninterrupted[recipe], resumed)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "step", "hook"), kill_points(20, seed=1515))
def test_many_random_kill_points_resume_like_an_uninterrupted_run(
    tmp_path, uninterrupted, recipe, step, hook
):
    resumed = interrupted_then_resumed(RECIPES[recipe](), tmp_path, step, hook)
    assert_same_result(uninterrupted[recipe], resumed)


def test_killed_twice_with_gradient_accumulation_resumes_like_an_uninterrupted_run(tmp_path):
    whole = train(PRUNING_WITH_QAT, accumulate=2)
    for step in (3, 7):  # 4 optimizer steps per epoch
        with pytest.raises(InjectedFault):
            train(
                PRUNING_WITH_QAT,
                tmp_path,
                fault=FailAt(step, "on_before_optimizer_step"),
                resume=step > 3,
                accumulate=2,
            )
    assert_same_result(whole, train(PRUNING_WITH_QAT, tmp_path, resume=True, accumulate=2))


def test_resume_after_qat_ended_loads_the_baked_layers(tmp_path):
    whole = train(PRUNING_WITH_QAT)  # QAT ends at step 20 of 24 and bakes the weights
    resumed = interrupted_then_resumed(PRUNING_WITH_QAT, tmp_path, 22, "on_train_batch_start")
    assert_same_result(whole, resumed)


def test_a_failure_after_qat_ended_raises_itself_and_leaves_the_layers_quantized():
    # Before, cleaning up tried to remove the already removed parametrization and raised
    # a ValueError in place of the failure.
    model = Regressor(optimizer="adam")
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=3,
        callbacks=[FailAt(22, "on_train_batch_start"), Compressor(PRUNING_WITH_QAT)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(InjectedFault):
        trainer.fit(model, training_data())
    for layer in (model.fc1, model.fc2):  # baked at step 20: they keep their quantization
        assert hasattr(layer, "quantization_scheme") and "weight_scale" in layer._buffers
        assert "weight_mask" not in layer._buffers  # the unfinished pruning is undone


def test_baking_a_qat_weight_keeps_its_gradient_accumulator_for_ddp_hooks():
    # DDP reduces gradients from hooks on each parameter's gradient accumulator; baking
    # used to swap the parameter's storage (set_), after which those hooks never fired.
    from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme
    from lightning_compress.modifiers.quantization.qat import (
        add_weight_fake_quantizer,
        bake_weight,
        training_buffers,
    )

    layer = torch.nn.Linear(16, 8)
    weights = QuantizationArgs(num_bits=8, strategy="channel")  # 16 inputs: no groups of 128
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=None)
    for name, value in training_buffers(layer.weight, scheme).items():
        layer.register_buffer(name, value)
    quantizer = add_weight_fake_quantizer(layer, scheme.weights)
    quantizer.enabled = True
    parameter = layer.parametrizations.weight.original
    accumulator = parameter.view_as(parameter).grad_fn.next_functions[0][0]
    fired: list[bool] = []
    accumulator.register_hook(lambda *_: fired.append(True))
    expected = layer.weight.detach().clone()
    bake_weight(layer)
    assert layer.weight is parameter
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=0)
    layer(torch.randn(2, 16)).sum().backward()
    assert fired


# ------------------------------------------------------------------------ recipes on resume
PYTHON_PRUNING_WITH_QAT = [
    MagnitudePruningModifier(
        targets=["fc1", "fc2"], final_sparsity=0.8, start=0, end=2, update=0.25
    ),
    QuantizationModifier(
        start=0.5,
        end=2.5,
        config_groups={
            "g": {"targets": ["Linear"], "weights": {"num_bits": 2, "strategy": "channel"}}
        },
    ),
]


def test_resume_accepts_the_same_recipe_written_as_yaml_and_as_python_modifiers(tmp_path):
    whole = train(PRUNING_WITH_QAT)
    with pytest.raises(InjectedFault):
        train(PRUNING_WITH_QAT, tmp_path, fault=FailAt(6, "on_train_batch_start"))
    resumed = train(PYTHON_PRUNING_WITH_QAT, tmp_path, resume=True)
    assert_same_result(whole, resumed)


def test_resume_refuses_a_recipe_with_other_settings(tmp_path):
    with pytest.raises(InjectedFault):
        train(PRUNING_WITH_QAT, tmp_path, fault=FailAt(6, "on_train_batch_start"))
    with pytest.raises(RecipeError, match="different recipe"):
        train(
            PRUNING_WITH_QAT.replace("final_sparsity: 0.8", "final_sparsity: 0.7"),
            tmp_path,
            resume=True,
        )


def test_recipes_compare_by_their_modifiers_and_settings_not_by_names():
    from lightning_compress.recipe import Recipe

    written = Recipe.create_instance(PRUNING_WITH_QAT)
    assert written.same_modifiers(Recipe.create_instance(PYTHON_PRUNING_WITH_QAT))
    renamed = PRUNING_WITH_QAT.replace("prune_stage", "a_stage").replace("quant_", "q_")
    assert written.same_modifiers(Recipe.create_instance(renamed))
    one_name, one_item_list = (
        Recipe.create_instance(PRUNING_WITH_QAT.replace("[fc1, fc2]", spelling))
        for spelling in ("fc1", "[fc1]")
    )
    assert one_name.same_modifiers(one_item_list)
    other_order = list(reversed(PYTHON_PRUNING_WITH_QAT))
    assert not written.same_modifiers(Recipe.create_instance(other_order))
    other_value = PRUNING_WITH_QAT.replace("update: 0.25", "update: 0.5")
    assert not written.same_modifiers(Recipe.create_instance(other_value))


def test_resume_with_another_epoch_geometry_warns_that_it_is_not_exact(tmp_path):
    messages: list[str] = []
    with pytest.raises(InjectedFault):
        train(PRUNING_WITH_QAT, tmp_path, fault=FailAt(8, "on_train_batch_start"))
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        train(PRUNING_WITH_QAT, tmp_path, resume=True, accumulate=2)
    finally:
        logger.remove(sink)
    assert any("steps per epoch" in message and "not exact" in message for message in messages)


PRUNING = PRUNING_WITH_QAT.split("  quant_modifiers")[0]


@pytest.mark.parametrize(
    ("saved", "resumed_with"),
    [
        pytest.param(PRUNING, PRUNING_WITH_QAT, id="adds_quantization"),
        pytest.param(PRUNING_WITH_QAT, PRUNING, id="drops_quantization"),
        pytest.param(PRUNING, PRUNING.replace("[fc1, fc2]", "[fc1]"), id="prunes_fewer_layers"),
        pytest.param(PRUNING, None, id="no_recipe"),
    ],
)
def test_resume_with_a_recipe_of_other_compression_state_is_refused_naming_it(
    tmp_path, saved, resumed_with
):
    with pytest.raises(InjectedFault):
        train(saved, tmp_path, fault=FailAt(6, "on_train_batch_start"))
    with pytest.raises(RecipeError, match="compression state does not match") as error:
        train(resumed_with, tmp_path, resume=True)
    assert "weight_mask" in str(error.value) or "weight_scale" in str(error.value)


# ------------------------------------------------------------------------------- save_dir
def test_an_unwritable_save_dir_fails_at_setup_before_any_training_step(tmp_path):
    from lightning_compress.export import ExportError  # the optional hf extra

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    save_dir = blocker / "compressed"
    recorder = DataRecorder()
    model = Regressor()
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[Compressor(PRUNING, save_dir=save_dir), recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ExportError, match=str(save_dir)):
        trainer.fit(model, training_data())
    assert recorder.seen == []
    assert not [name for name, _ in model.named_buffers() if name.endswith("weight_mask")]


# ------------------------------------------------------------------------------------ DDP
class SaveFinal(Callback):
    """Rank 0 saves the model's state after the Compressor finalized (listed after it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            torch.save(
                {k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.path
            )


def train_ddp(out: Path, result: Path, fault: Callback | None = None, resume: bool = False):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, 16, generator=generator)
    y = x @ torch.randn(16, 4, generator=generator)
    callbacks = [*([fault] if fault else []), Compressor(PRUNING_WITH_QAT), SaveFinal(result)]
    callbacks.append(
        ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=0, save_last=True)
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=3,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt = str(out / "last.ckpt") if resume else None
    trainer.fit(
        Regressor(optimizer="adam"),
        DataLoader(TensorDataset(x, y), batch_size=BATCH),
        ckpt_path=ckpt,
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_run_killed_at_a_pruning_update_with_qat_active_resumes_exactly(tmp_path):
    # 2 ranks: 4 steps per epoch; kill at an epoch boundary (a plain DataLoader restarts
    # there exactly) where a pruning update is due (every 2 steps) and QAT is active.
    step = random.Random(15).choice([8, 12])
    train_ddp(tmp_path / "whole", tmp_path / "whole.pt")
    with pytest.raises(Exception, match="injected"):
        train_ddp(tmp_path / "broken", tmp_path / "unused.pt", FailAt(step, "on_train_batch_start"))
    train_ddp(tmp_path / "broken", tmp_path / "resumed.pt", resume=True)
    expected = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert_same_result(expected, torch.load(tmp_path / "resumed.pt", weights_only=True))


def test_the_compressor_leaves_no_load_check_on_the_model(tmp_path):
    def fit(max_steps: int, resume: bool) -> Regressor:
        model = Regressor(optimizer="adam")
        trainer = Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            callbacks=[
                Compressor(PRUNING),
                ModelCheckpoint(
                    dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0
                ),
            ],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        ckpt = str(tmp_path / "last.ckpt") if resume else None
        trainer.fit(model, training_data(), ckpt_path=ckpt)
        return model

    assert not fit(4, resume=False)._load_state_dict_post_hooks
    # Resumed at its last step: Lightning skips training, so only teardown can remove it.
    assert not fit(4, resume=True)._load_state_dict_post_hooks


def test_resuming_a_checkpoint_saved_after_compression_finished_says_so(tmp_path):
    def fit(max_steps: int, resume: bool) -> None:
        trainer = Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            callbacks=[
                Compressor(PRUNING),
                ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0),
            ],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        ckpt = str(tmp_path / "last.ckpt") if resume else None
        trainer.fit(Regressor(optimizer="adam"), training_data(), ckpt_path=ckpt)

    fit(4, resume=False)  # last.ckpt is written when training ends, after finalize
    with pytest.raises(RecipeError, match="saved after compression finished"):
        fit(8, resume=True)


class CheckingRegressor(Regressor):
    """A user module that refuses resuming a compressing run without its Compressor."""

    def on_load_checkpoint(self, checkpoint) -> None:
        check_compressor_resume(self.trainer, checkpoint)


def fit_checking(out: Path, compressor: bool, resume: bool, max_steps: int) -> None:
    callbacks: list[Callback] = [Compressor(PRUNING)] if compressor else []
    callbacks.append(
        ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_top_k=0, save_last=True)
    )
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt = str(out / "last.ckpt") if resume else None
    trainer.fit(CheckingRegressor(optimizer="adam"), training_data(), ckpt_path=ckpt)


def test_resume_without_the_compressor_is_refused_naming_the_recipe(tmp_path):
    fit_checking(tmp_path, compressor=True, resume=False, max_steps=3)
    with pytest.raises(RecipeError, match="MagnitudePruningModifier") as error:
        fit_checking(tmp_path, compressor=False, resume=True, max_steps=6)
    assert "this Trainer has none" in str(error.value)
    fit_checking(tmp_path, compressor=True, resume=True, max_steps=6)  # with it: resumes


def test_causal_lm_module_refuses_a_compressing_checkpoint_without_a_compressor():
    from lightning.pytorch.trainer.states import TrainerFn

    from lightning_compress.lightning.language_model import CausalLMModule

    module = CausalLMModule(model=torch.nn.Linear(4, 4))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.state.fn = TrainerFn.FITTING
    module.trainer = trainer
    checkpoint = {"callbacks": {"Compressor": {"recipe": "default_stage: ..."}}, "state_dict": {}}
    with pytest.raises(RecipeError, match="this Trainer has none"):
        module.on_load_checkpoint(checkpoint)
    module.on_load_checkpoint({"callbacks": {}, "state_dict": {}})  # a plain checkpoint loads
    finished = {"Compressor": {"recipe": "default_stage: ...", "finalized": True}}
    module.on_load_checkpoint({"callbacks": finished, "state_dict": {}})  # compression done
