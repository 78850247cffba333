"""Calibration pipelines feed every expert every token by default, routed tokens on request."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from moe_models import tiny_moe, tokens

from lightning_compress.core import CompressionSession, State
from lightning_compress.layers import LinearExperts
from lightning_compress.modifiers.base import Modifier
from lightning_compress.pipelines import PipelineOptions, create_pipeline


class RowCounter(Modifier):
    """Counts the input rows each target layer sees during calibration."""

    targets: str | list[str] = "re:.*experts.1.up_proj$"
    last_rows: ClassVar[dict[str, int]] = {}  # of the latest instance (recipes copy modifiers)

    @property
    def needs_calibration_data(self) -> bool:
        return True

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.rows: dict[str, int] = {}
        RowCounter.last_rows = self.rows
        for name, layer in self.resolve_targets(state.model).items():
            self.rows[name] = 0
            self.register_hook(layer, self._hook(name), "forward")

    def _hook(self, name: str):
        def count(module, args, output):
            self.rows[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return count


def calibrate(model, pipeline: str, **options) -> dict[str, int]:
    session = CompressionSession()
    session.initialize(recipe=RowCounter(), model=model)
    batches = [tokens(1, 12, seed) for seed in range(3)]
    create_pipeline(pipeline, model, session, PipelineOptions(**options))(batches)
    (counter,) = session.lifecycle.recipe.modifiers
    session.finalize()
    return counter.rows


@pytest.mark.parametrize("pipeline", ["sequential", "basic"])
def test_every_expert_sees_every_calibration_token_by_default(pipeline):
    model = tiny_moe("mixtral")
    rows = calibrate(model, pipeline)
    assert rows == {f"model.layers.{i}.mlp.experts.1.up_proj": 3 * 12 for i in range(2)}
    assert not any(m.calibrate_all for m in model.modules() if isinstance(m, LinearExperts))


def routed_counts(model, batches) -> dict[str, int]:
    """Tokens the router sends to expert 1 of each block, over ``batches``."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LinearExperts):
            counts[f"{name}.1.up_proj"] = 0

            def hook(module, args, output, key=f"{name}.1.up_proj"):
                counts[key] += int((args[1] == 1).any(dim=-1).sum())

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return counts


@pytest.mark.parametrize("pipeline", ["sequential", "basic"])
def test_routed_only_calibration_feeds_each_expert_its_tokens(pipeline):
    model = tiny_moe("mixtral")
    rows = calibrate(model, pipeline, moe_calibrate_all_experts=False)
    expected = routed_counts(model, [tokens(1, 12, seed) for seed in range(3)])
    assert rows == expected
    assert all(0 < count < 3 * 12 for count in rows.values())


def test_oneshot_switches_between_all_tokens_and_routed_tokens():
    from export_models import QUIET

    from lightning_compress.lightning.oneshot import oneshot

    batches = torch.cat([tokens(1, 12, seed) for seed in range(3)])
    seen = {}
    for everything in (True, False):
        model = tiny_moe("mixtral")
        oneshot(
            model,
            RowCounter(),
            batches,
            num_calibration_samples=3,
            moe_calibrate_all_experts=everything,
            trainer_kwargs=QUIET,
            progress=False,
        )
        seen[everything] = dict(RowCounter.last_rows)
    assert set(seen[True].values()) == {3 * 12}
    assert seen[False] == routed_counts(model, [batches[i : i + 1] for i in range(3)])
