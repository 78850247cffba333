"""What a model runs after its last block (the final norm and the LM head), calibrated.

The sequential pipeline feeds the blocks from its activation cache, so the modules after them
never run on their own. When a modifier observes one of them (GPTQ, SparseGPT or Wanda on
``lm_head``, a static input observer), :class:`ModelTail` runs the model's forward once more
per calibration batch with every block replaced by the cached output of the last one: the
modules before the blocks run again with their calibration hooks suspended (they were
observed when the block inputs were captured), the blocks' own hooks are suspended, and the
modules after them run with their hooks, on the hidden states the compressed blocks produced.
The logits are dropped at once (and ``labels`` are left out, so no loss is computed).

Which modules count is found without tracing: the *outside modules* are the modules that are
neither a block, inside one, nor hold one (``model.embed_tokens``, ``model.norm``,
``lm_head``). Those called while the model runs up to its first block come before the
blocks; the others, the tail, are the ones this pass is for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from lightning_compress.core.distributed import all_reduce_max_
from lightning_compress.pipelines.blocks import Block
from lightning_compress.pipelines.capture import call_model
from lightning_compress.pipelines.snapshot import hook_keys, hooks_suspended

__all__ = ["ModelTail", "outside_modules"]


def outside_modules(model: nn.Module, blocks: Sequence[Block]) -> list[Block]:
    """The outermost modules of ``model`` that are neither a block, inside one, nor hold one.

    Args:
        model: the model.
        blocks: its blocks, by name.

    Returns:
        ``(name, module)`` pairs in module order (``model.embed_tokens``, ``model.norm``,
        ``lm_head`` for a Hugging Face causal LM).
    """
    block_names = {name for name, _ in blocks}
    holders = {""}
    for name in block_names:
        parts = name.split(".")
        holders.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return [
        (name, module)
        for name, module in model.named_modules()
        if name not in holders and name not in block_names and name.rpartition(".")[0] in holders
    ]


class ModelTail:
    """The modules outside the blocks, and the calibration forward of those after them.

    Use: :meth:`watch` once the calibration hooks are on; :meth:`capturing` around each
    capture of the first block's inputs (it notes which observed modules run before the
    blocks); :meth:`needs_calibration` after the blocks; then :meth:`forward` per batch and a
    SEQUENTIAL_EPOCH_END for :attr:`subgraph`.

    Args:
        model: the model.
        blocks: its blocks, in calibration order.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[Block]) -> None:
        self.model = model
        self.blocks = [block for _, block in blocks]
        self.modules = outside_modules(model, blocks)
        self.subgraph = nn.ModuleList(module for _, module in self.modules)
        self._observed: dict[int, nn.Module] = {}

    @property
    def watching(self) -> bool:
        """Whether some observed outside module has not been seen running before the blocks
        (the calibration batches are needed again for the tail)."""
        return bool(self._observed)

    def watch(self) -> None:
        """Notes the outside modules that hold hooks (the calibration hooks, once the
        modifiers started)."""
        self._observed = {id(module): module for _, module in self.modules if hook_keys(module)}

    @contextmanager
    def capturing(self) -> Iterator[None]:
        """Inside the context, observed outside modules that run are noted as coming before
        the blocks (wrap the capture of the first block's inputs, which stops at it).

        Yields:
            Nothing.
        """

        def ran(module: nn.Module, args: tuple) -> None:
            self._observed.pop(id(module), None)

        handles = [module.register_forward_pre_hook(ran) for module in self._observed.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def needs_calibration(self, has_batches: bool) -> bool:
        """Whether the tail holds observed modules, on any rank (a collective call).

        Args:
            has_batches: whether this rank has calibration batches.

        Returns:
            The same answer on every rank.
        """
        needed = torch.tensor([int(has_batches and self.watching)], dtype=torch.long)
        return bool(all_reduce_max_(needed).item())

    def forward(self, batch: Any, hidden_states: torch.Tensor, as_tuple: bool) -> None:
        """Runs the model on ``batch`` with every block giving ``hidden_states``.

        Only the hooks of the modules after the blocks (and of the modules holding the
        blocks, such as the model's attention-mask hook) observe this forward.

        Args:
            batch: the calibration batch (see ``call_model``).
            hidden_states: the last block's output for it, on the tail's device.
            as_tuple: the blocks return a tuple whose first element is the hidden states.
        """
        output = (hidden_states,) if as_tuple else hidden_states
        if isinstance(batch, Mapping):
            batch = {key: value for key, value in batch.items() if key != "labels"}
        with ExitStack() as before_blocks, self._blocks_replaced(output, before_blocks):
            before_blocks.enter_context(hooks_suspended(self.subgraph))
            call_model(self.model, batch)

    @contextmanager
    def _blocks_replaced(self, output: Any, before_blocks: ExitStack) -> Iterator[None]:
        """Inside the context each block returns ``output`` without running, its hooks
        suspended; the first call closes ``before_blocks`` (the outside modules' hooks come
        back for the modules after the blocks)."""

        def replacement(*args: Any, **kwargs: Any) -> Any:
            before_blocks.close()
            return output

        with ExitStack() as stack:
            for block in self.blocks:
                stack.enter_context(hooks_suspended(block))
                stack.enter_context(_forward_replaced(block, replacement))
            yield


@contextmanager
def _forward_replaced(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    """``module.forward`` is ``forward`` inside the context (an instance attribute it had is
    put back after)."""
    own = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
