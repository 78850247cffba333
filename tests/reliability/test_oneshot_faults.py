"""Faults during one-shot calibration: whatever raises, the model is left in its documented state.

The documented state after a failure: no calibration hook, observer, temporary buffer or
attribute is left on the model; its train/eval modes are restored; blocks finished before the
failure hold exactly the compression state a complete run gives them, every other block is
bitwise as it was; a model left partly compressed says so (``model.partial_compression``, a
note on the exception) and ``save_compressed`` refuses it. Later runs are unaffected.

Fault points are drawn with a fixed seed: a collate function or a ``Dataset`` raising at
batch k, a modifier raising at the k-th SEQUENTIAL_EPOCH_END (a whole block or one group of
layers of a staged block), the model's own forward raising at its k-th block call, and
Ctrl-C at any of those places.
"""

from __future__ import annotations

import copy
import random
import signal
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, Dataset

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.core import Event, EventType, State
from lightning_compress.export import ExportError, save_compressed
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import (
    AWQModifier,
    GPTQModifier,
    Modifier,
    QuantizationModifier,
    SmoothQuantModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)
from lightning_compress.modifiers.quantization.runtime import InputQuantizer
from lightning_compress.pipelines import partial_compression

SEED = 15
CONFIG = TinyDecoderConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4)
DATA = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(SEED))
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}
W4_G16 = {"num_bits": 4, "strategy": "group", "group_size": 16}
W4_GROUPS = {"w4": {"targets": ["Linear"], "weights": W4_G16}}
W8A8_STATIC = {
    "w8a8": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False},
    }
}
RECIPES = {
    "rtn": lambda: [QuantizationModifier(config_groups=W4_GROUPS, ignore=["lm_head"])],
    "gptq": lambda: [GPTQModifier(config_groups=W4_GROUPS, ignore=["lm_head"])],
    "sparsegpt": lambda: [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"])
    ],
    "wanda": lambda: [WandaPruningModifier(sparsity=0.5, ignore=["lm_head"])],
    "smoothquant_gptq": lambda: [
        SmoothQuantModifier(),
        GPTQModifier(config_groups=W8A8_STATIC, ignore=["lm_head"]),
    ],
    "awq_rtn": lambda: [
        AWQModifier(weights=W4_G16, ignore=["lm_head"]),
        QuantizationModifier(config_groups=W4_GROUPS, ignore=["lm_head"]),
    ],
}
KINDS = ("collate", "dataset", "modifier", "modifier_interrupt", "model", "model_interrupt")


# ------------------------------------------------------------------ fault injection
class InjectedFault(Modifier):
    """Raises at the ``at``-th SEQUENTIAL_EPOCH_END (from 0) and records the block of each.

    It compresses nothing itself and lets blocks run staged, so the real modifiers of the
    recipe behave as without it; placed after them it raises once they have compressed.
    The recipe builds its own instance: the latest one initialized is ``InjectedFault.latest``.
    """

    at: int | None = None
    at_end: bool = False
    interrupt: bool = False
    latest: ClassVar[InjectedFault | None] = None

    @property
    def needs_calibration_data(self) -> bool:
        return True

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module] | None:
        return []

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.blocks = list(state.model.model.layers)
        self.events: list[int] = []
        InjectedFault.latest = self

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ == EventType.CALIBRATION_EPOCH_END and self.at_end:
            raise _fault(self.interrupt, "CALIBRATION_EPOCH_END")
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return
        self.events.append(_block_of(self.blocks, kwargs["subgraph"]))
        if len(self.events) - 1 == self.at:
            raise _fault(self.interrupt, f"SEQUENTIAL_EPOCH_END {self.at}")


class BlockCalls:
    """A forward pre-hook on every block: records which block each call runs, raises at one."""

    def __init__(self, model: nn.Module, at: int | None = None, interrupt: bool = False) -> None:
        self.at, self.interrupt = at, interrupt
        self.calls: list[int] = []
        self.handles = [
            block.register_forward_pre_hook(self._hook(index))
            for index, block in enumerate(model.model.layers)
        ]

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self.calls.append(index)
            if len(self.calls) - 1 == self.at:
                raise _fault(self.interrupt, f"block call {self.at}")

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Rows(Dataset):
    """``DATA`` row by row; raises at item ``at``."""

    def __init__(self, at: int | None = None, interrupt: bool = False) -> None:
        self.at, self.interrupt = at, interrupt

    def __len__(self) -> int:
        return len(DATA)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.at:
            raise _fault(self.interrupt, f"item {index}")
        return DATA[index]


class FailingCollate:
    """Stacks the rows; raises at batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, rows: list[torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.calls - 1 == self.at:
            raise ValueError(f"injected fault: collate of batch {self.at}")
        return torch.stack(rows)


def _fault(interrupt: bool, where: str) -> BaseException:
    return KeyboardInterrupt(where) if interrupt else RuntimeError(f"injected fault: {where}")


def _block_of(blocks: list[nn.Module], subgraph: nn.Module) -> int:
    """The index of the block ``subgraph`` starts in; ``len(blocks)`` for the model's tail (the
    modules after the blocks, calibrated last)."""
    first = next(subgraph.modules()) if not isinstance(subgraph, nn.ModuleList) else subgraph[0]
    found = (i for i, block in enumerate(blocks) if any(m is first for m in block.modules()))
    return next(found, len(blocks))


# ------------------------------------------------------------------------- runs
def fresh_model() -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder(CONFIG).train()


def recipe(name: str, fault: InjectedFault, fault_first: bool) -> list[Modifier]:
    modifiers = RECIPES[name]()
    return [fault, *modifiers] if fault_first else [*modifiers, fault]


def run_oneshot(model: nn.Module, modifiers: list[Modifier]) -> None:
    oneshot(model, modifiers, dataset=DATA, num_calibration_samples=None, trainer_kwargs=QUIET)


def trainer() -> Trainer:
    return Trainer(
        accelerator="cpu", inference_mode=False, logger=False, enable_checkpointing=False, **QUIET
    )


@dataclass
class Reference:
    """A complete run of a recipe: the compressed model and where each fault point falls."""

    model: nn.Module
    event_blocks: list[int]
    call_blocks: list[int]


REFERENCES: dict[tuple[str, bool], Reference] = {}


def reference(name: str, observed: bool = False) -> Reference:
    """The complete run of ``name`` with an inert fault modifier; ``observed``: with the call
    recorder on the blocks (a hook on a block changes how the pipeline runs it)."""
    if (name, observed) not in REFERENCES:
        model = fresh_model()
        calls = BlockCalls(model) if observed else None
        run_oneshot(model, recipe(name, InjectedFault(), fault_first=False))
        if calls is not None:
            calls.remove()
        events = InjectedFault.latest.events
        REFERENCES[name, observed] = Reference(model, events, calls.calls if calls else [])
    return REFERENCES[name, observed]


@dataclass
class Before:
    """What the model held before the calibration."""

    state: dict[str, torch.Tensor]
    attributes: dict[str, set[str]]
    modes: dict[str, bool]
    sigint: Any = field(default_factory=lambda: signal.getsignal(signal.SIGINT))

    @classmethod
    def of(cls, model: nn.Module) -> Before:
        return cls(
            {key: value.clone() for key, value in model.state_dict().items()},
            {name: set(vars(module)) for name, module in model.named_modules()},
            {name: module.training for name, module in model.named_modules()},
        )


def hooks_of(module: nn.Module) -> list[Any]:
    return [
        hook
        for attribute in (
            "_forward_pre_hooks",
            "_forward_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
        )
        for hook in getattr(module, attribute).values()
    ]


def assert_documented_state(
    model: nn.Module, before: Before, done: int, ref: Reference, error: BaseException | None
) -> None:
    """Blocks ``< done`` hold the complete run's compression state, the rest is unchanged, and
    nothing else the library adds is left."""
    finished = {f"model.layers.{index}" for index in range(done)}

    def in_finished(name: str) -> bool:
        return any(name == block or name.startswith(f"{block}.") for block in finished)

    expected_state = {
        key: value
        for key, value in ref.model.state_dict().items()
        if in_finished(key.rsplit(".", 1)[0])
    }
    expected_state.update(
        (key, value) for key, value in before.state.items() if not in_finished(key)
    )
    state = model.state_dict()
    assert sorted(state) == sorted(expected_state)
    for key, value in state.items():
        if in_finished(key):
            torch.testing.assert_close(value, expected_state[key], msg=key)
        else:  # restored or never touched: copy work, bitwise
            assert torch.equal(value, expected_state[key]), key
    ref_modules = dict(ref.model.named_modules())
    for name, module in model.named_modules():
        added = set(vars(module)) - before.attributes[name]
        public = {attribute for attribute in added if not attribute.startswith("_")}
        if name == "":
            public.discard("partial_compression")
        if in_finished(name):
            reference_module = ref_modules[name]
            assert public == set(vars(reference_module)) - before.attributes[name], name
            assert [type(h) for h in hooks_of(module)] == [
                type(h) for h in hooks_of(reference_module)
            ]
            assert all(isinstance(hook, InputQuantizer) for hook in hooks_of(module)), name
        else:
            assert public == set(), name
            assert hooks_of(module) == [], name
        assert not parametrize.is_parametrized(module), name
        assert module.training == before.modes[name], name
    record = partial_compression(model)
    if done:
        assert record is not None and record.compressed == tuple(sorted(finished))
        assert record.blocks == CONFIG.num_layers
        assert error is not None and any(
            f"{done} of {CONFIG.num_layers} blocks are compressed" in note
            for note in getattr(error, "__notes__", [])
        )
    else:
        assert record is None
    assert Modifier._hooks_disabled_globally == 0
    assert signal.getsignal(signal.SIGINT) == before.sigint


@pytest.fixture(autouse=True)
def sigint_kept():
    """Whatever a test does, the next one starts with the usual SIGINT handler."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def inject(kind: str, name: str, fraction: float, fault_first: bool) -> tuple[nn.Module, Before]:
    """Run recipe ``name`` with a fault of ``kind`` at ``fraction`` of its fault points, check
    the documented state, and return the model."""
    ref = reference(name, observed=kind.startswith("model"))
    model = fresh_model()
    before = Before.of(model)
    interrupt = kind.endswith("interrupt")
    expected = KeyboardInterrupt if interrupt else (RuntimeError, ValueError)
    calls = None
    if kind in ("collate", "dataset"):
        at = int(fraction * len(DATA))
        rows, collate = (Rows(), FailingCollate(at)) if kind == "collate" else (Rows(at), None)
        module = CalibrationModule(model, recipe(name, InjectedFault(), fault_first))
        with pytest.raises(expected, match="injected fault") as raised:
            loader = DataLoader(rows, batch_size=1, collate_fn=collate)
            trainer().validate(module, dataloaders=loader, verbose=False)
        done = 0
    elif kind.startswith("modifier"):
        at = int(fraction * len(ref.event_blocks))
        fault = InjectedFault(at=at, interrupt=interrupt)
        with pytest.raises(expected) as raised:
            run_oneshot(model, recipe(name, fault, fault_first))
        done = ref.event_blocks[at]
    else:
        at = int(fraction * len(ref.call_blocks))
        calls = BlockCalls(model, at, interrupt)
        with pytest.raises(expected) as raised:
            run_oneshot(model, recipe(name, InjectedFault(), fault_first))
        calls.remove()
        done = ref.call_blocks[at]
    assert_documented_state(model, before, done, ref, raised.value)
    return model, before


def _cases(points: int) -> list[Any]:
    draw = random.Random(SEED)
    return [
        pytest.param(kind, name, draw.random(), draw.random() < 0.5, id=f"{name}-{kind}-{point}")
        for name in RECIPES
        for kind in KINDS
        for point in range(points)
    ]


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("kind", "name", "fraction", "fault_first"), _cases(1))
def test_a_fault_anywhere_leaves_the_model_in_its_documented_state(
    kind: str, name: str, fraction: float, fault_first: bool
):
    inject(kind, name, fraction, fault_first)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "name", "fraction", "fault_first"), _cases(6))
def test_many_faults_leave_the_model_in_its_documented_state(
    kind: str, name: str, fraction: float, fault_first: bool
):
    inject(kind, name, fraction, fault_first)


@pytest.mark.parametrize("kind", ["collate", "dataset"])
def test_a_data_failure_mid_epoch_leaves_no_hook_and_a_later_oneshot_is_unaffected(kind):
    model, before = inject(kind, "smoothquant_gptq", 0.5, fault_first=False)
    run_oneshot(model, recipe("smoothquant_gptq", InjectedFault(), fault_first=False))
    for key, value in reference("smoothquant_gptq").model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_failure_after_the_first_block_keeps_finished_blocks_compressed_and_recorded(name):
    ref = reference(name)
    at = ref.event_blocks.index(2)  # the first compression event of the last block
    model, _ = inject("modifier", name, (at + 0.5) / len(ref.event_blocks), fault_first=False)
    record = partial_compression(model)
    assert record.compressed == ("model.layers.0", "model.layers.1")


def test_ctrl_c_during_oneshot_raises_keyboard_interrupt_after_cleaning_up():
    ref = reference("gptq")
    middle = (ref.event_blocks.index(1) + 0.5) / len(ref.event_blocks)
    inject("modifier_interrupt", "gptq", middle, fault_first=False)
    inject("model_interrupt", "gptq", 0.0, fault_first=False)


def test_a_caller_catches_ctrl_c_from_oneshot_as_keyboard_interrupt():
    model = fresh_model()
    caught = []
    try:
        run_oneshot(model, recipe("rtn", InjectedFault(at=0, interrupt=True), fault_first=False))
    except KeyboardInterrupt as interrupt:
        caught.append(interrupt)
    except SystemExit:  # what Lightning's shutdown raises
        pass
    assert len(caught) == 1 and str(caught[0]) == "SEQUENTIAL_EPOCH_END 0"


def test_ctrl_c_in_the_dataset_reaches_the_caller_with_the_model_untouched():
    model = fresh_model()
    before = Before.of(model)
    with pytest.raises(KeyboardInterrupt):
        oneshot(model, RECIPES["gptq"](), dataset=Rows(at=2, interrupt=True), trainer_kwargs=QUIET)
    assert_documented_state(model, before, 0, reference("gptq"), None)


def test_save_compressed_refuses_a_partly_compressed_model(tmp_path):
    ref = reference("gptq")
    model, _ = inject("modifier", "gptq", 0.0, fault_first=False)
    assert partial_compression(model) is None  # a fault in block 0: nothing compressed
    at = (ref.event_blocks.index(2) + 0.5) / len(ref.event_blocks)
    model, _ = inject("modifier", "gptq", at, fault_first=False)
    target = tmp_path / "out"
    with pytest.raises(ExportError, match=r"partly compressed \(2 of 3 blocks are compressed"):
        save_compressed(model, target)
    assert not target.exists()


def test_oneshot_refuses_a_partly_compressed_model_before_changing_it():
    ref = reference("wanda")
    at = (ref.event_blocks.index(1) + 0.5) / len(ref.event_blocks)
    model, _ = inject("modifier", "wanda", at, fault_first=False)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="left it partly compressed .1 of 3 blocks"):
        run_oneshot(model, RECIPES["wanda"]())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert all(hooks_of(module) == [] for module in model.modules())


def test_a_failed_run_leaves_a_later_oneshot_on_a_fresh_model_unaffected():
    for name in ("gptq", "awq_rtn"):
        ref = reference(name)
        with pytest.raises(KeyboardInterrupt):
            run_oneshot(fresh_model(), recipe(name, InjectedFault(at=1, interrupt=True), True))
        model = fresh_model()
        run_oneshot(model, recipe(name, InjectedFault(), fault_first=False))
        for key, value in ref.model.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)


def test_ctrl_c_under_trainer_validate_cleans_up_before_lightnings_exit():
    model = fresh_model()
    before = Before.of(model)
    module = CalibrationModule(model, recipe("gptq", InjectedFault(), fault_first=False))
    loader = DataLoader(Rows(at=2, interrupt=True), batch_size=1)
    with pytest.raises(SystemExit):  # Lightning's shutdown; oneshot raises KeyboardInterrupt
        trainer().validate(module, dataloaders=loader, verbose=False)
    signal.signal(signal.SIGINT, before.sigint)  # Lightning ignores SIGINT from then on
    assert_documented_state(model, before, 0, reference("gptq"), None)


def test_a_failure_at_the_end_of_a_data_free_run_is_recorded(tmp_path):
    model = fresh_model()
    modifiers = [*RECIPES["rtn"](), InjectedFault(at_end=True)]
    with pytest.raises(RuntimeError, match="CALIBRATION_EPOCH_END") as raised:
        oneshot(model, modifiers)
    record = partial_compression(model)
    assert record is not None and record.at_end and record.blocks == 0
    assert any("compressed at the end" in note for note in raised.value.__notes__)
    assert all(hooks_of(module) == [] for module in model.modules())
    with pytest.raises(ExportError, match="partly compressed"):
        save_compressed(model, tmp_path / "out")


def test_a_data_failure_removes_the_spilled_activations(tmp_path):
    model = fresh_model()
    module = CalibrationModule(model, RECIPES["gptq"](), offload_dir=tmp_path)
    loader = DataLoader(Rows(), batch_size=1, collate_fn=FailingCollate(at=2))
    with pytest.raises(ValueError, match="injected fault"):
        trainer().validate(module, dataloaders=loader, verbose=False)
    assert list(tmp_path.iterdir()) == []
    assert all(hooks_of(layer) == [] for layer in model.modules())
