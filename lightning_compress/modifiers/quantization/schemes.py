"""``QuantizationSchemes``: the scheme settings quantizing modifiers share.

``QuantizationModifier`` and ``GPTQModifier`` take their schemes alike (a ``scheme`` preset
or compressed-tensors ``config_groups``), check them alike and plan each targeted layer with
its scheme alike; this is that piece, without any of the quantizing itself.

A ``GPTQModifier`` given no scheme takes those of the ``QuantizationModifier`` of its recipe
stage, as llm-compressor's does: it quantizes the ``Linear`` layers of those schemes (each
once, with GPTQ), and the ``QuantizationModifier`` keeps the others (an ``Embedding``) and its
KV-cache settings.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from lightning_compress.core.model_layer import module_matches
from lightning_compress.modifiers.base import Modifier
from lightning_compress.modifiers.layerwise_modifier import PendingLayer
from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.attention import attention_modules
from lightning_compress.modifiers.quantization.block_padding import warn_about_padded_blocks
from lightning_compress.modifiers.quantization.embedding import quantized_layers
from lightning_compress.modifiers.quantization.kv_cache import (
    AttentionScheme,
    check_attention_args,
    is_attention_scheme,
)
from lightning_compress.recipe.errors import RecipeError

__all__ = ["QuantizationSchemes", "has_static_inputs"]


class QuantizationSchemes(Modifier, register=False):
    """The ``scheme`` / ``config_groups`` settings, their checks, and the plan of layers.

    Args:
        scheme: a preset name (``W8A16``, ``W4A16``, ``W4A16_ASYM``, ``W8A8``, ``W4A8``,
            ``FP8``, ``FP8_DYNAMIC``) applied to ``targets``, or ``{preset: [targets]}``.
        config_groups: ``{group_name: {targets, weights: {...}, input_activations: {...}}}``
            in compressed-tensors form (``num_bits``, ``type``, ``symmetric``, ``strategy``,
            ``group_size``, ``dynamic``, ``observer``, ``averaging_constant``). A group with
            only ``input_activations`` (static fp8, strategy ``tensor`` or ``attn_head``)
            whose targets are attention modules quantizes their queries, keys and values
            (see :mod:`~lightning_compress.modifiers.quantization.kv_cache`).
        kv_cache_scheme: fp8 arguments (``{num_bits: 8, type: float, symmetric: true,
            strategy: tensor | attn_head}``) of the keys and values of every attention module,
            calibrated on the calibration data; None leaves the KV cache unquantized.
    """

    scheme: str | dict[str, list[str]] | None = None
    config_groups: dict[str, dict[str, Any]] | None = None
    kv_cache_scheme: dict[str, Any] | None = None

    borrows_stage_schemes: ClassVar[bool] = False
    """Whether, given no scheme, it takes those of the lending modifier of its stage."""
    lends_stage_schemes: ClassVar[bool] = False
    """Whether a borrowing modifier of its stage may take its schemes."""
    quantizes_embeddings: ClassVar[bool] = False
    """Whether it quantizes ``nn.Embedding`` targets (weights only; see
    :mod:`~lightning_compress.modifiers.quantization.embedding`)."""
    _lender = None  # the modifier whose schemes it took (a borrower, after join_stage)
    _borrower = None  # the modifier that took its schemes (a lender, after join_stage)

    @property
    def has_own_schemes(self) -> bool:
        """Whether ``scheme``, ``config_groups`` or ``kv_cache_scheme`` is set."""
        return not (
            self.scheme is None and self.config_groups is None and self.kv_cache_scheme is None
        )

    def validate(self) -> None:
        if not self.has_own_schemes and not self.borrows_stage_schemes:
            self.fail(
                "scheme",
                f"a preset name ({', '.join(PRESET_SCHEMES)}), config_groups or kv_cache_scheme",
            )
        for where, scheme in self._labeled_schemes():
            self._check_scheme(where, scheme)
        self.kv_cache_args()
        self._attention_groups()
        super().validate()

    def join_stage(self, stage: str, modifiers: list[Modifier]) -> None:
        """A borrowing modifier without a scheme takes the schemes of the stage's lender.

        Args:
            stage: the stage's name.
            modifiers: the stage's modifiers.

        Raises:
            RecipeError: when no lender (or more than one) with a scheme is in the stage, the
                lender trains (QAT) or already lends, or a lent scheme does not suit this
                modifier (naming the field).
        """
        if self.has_own_schemes or not self.borrows_stage_schemes:
            return
        owner = type(self).__name__
        lenders = [
            modifier
            for modifier in modifiers
            if isinstance(modifier, QuantizationSchemes)
            and modifier.lends_stage_schemes
            and modifier._labeled_schemes()
        ]
        if len(lenders) != 1:
            found = "none" if not lenders else f"{len(lenders)}"
            raise RecipeError(
                f"{owner}: no scheme, config_groups or kv_cache_scheme, and stage '{stage}' holds "
                f"{found} QuantizationModifier with a scheme to take them from; expected a "
                "scheme (e.g. scheme: W4A16) or config_groups, or exactly one "
                "QuantizationModifier with the scheme in the same stage (GPTQ then quantizes "
                "its linear layers)"
            )
        (lender,) = lenders
        if not lender.is_one_shot or lender._borrower is not None:
            why = "trains (start >= 0)" if not lender.is_one_shot else "lends to another"
            raise RecipeError(
                f"{owner}: takes the schemes of the QuantizationModifier of stage '{stage}', "
                f"but that one {why}; expected a one-shot QuantizationModifier (start: -1) "
                f"for one {owner}, or a scheme of its own"
            )
        self._lender, lender._borrower = lender, self
        for where, scheme in self._labeled_schemes():
            self._check_scheme(where, scheme)

    def kv_cache_args(self) -> QuantizationArgs | None:
        """The arguments of ``kv_cache_scheme``, checked.

        Returns:
            The arguments, or None without a ``kv_cache_scheme``.

        Raises:
            RecipeError: naming the bad field of ``kv_cache_scheme``.
        """
        if self.kv_cache_scheme is None:
            return None
        where = f"{type(self).__name__}.kv_cache_scheme"
        try:
            args = QuantizationArgs.from_dict(self.kv_cache_scheme, where=where)
            check_attention_args(args, where)
        except ValueError as err:
            raise RecipeError(str(err)) from err
        return args

    def attention_plan(self, model: nn.Module) -> dict[str, tuple[nn.Module, AttentionScheme]]:
        """The attention modules whose states are quantized, each with its scheme.

        The ``kv_cache_scheme`` applies to every attention module of ``model`` (as
        compressed-tensors applies it, ``ignore`` aside: vLLM reads a scale for every
        attention layer); an attention group replaces it on its targets and quantizes their
        queries too.

        Args:
            model: the model.

        Returns:
            Attention module name to ``(module, scheme)``, in module order.

        Raises:
            RecipeError: when an attention group targets a module that is not an attention
                module, a module is targeted by two attention groups, or a
                ``kv_cache_scheme`` meets a model without attention modules.
        """
        owner = type(self).__name__
        found = attention_modules(model)
        kv_args = self.kv_cache_args()
        plan: dict[str, tuple[nn.Module, AttentionScheme]] = {}
        if kv_args is not None:
            if not found:
                raise RecipeError(
                    f"{owner}.kv_cache_scheme: {type(model).__name__} has no attention module "
                    "(a module whose class name contains 'Attention', with k_proj/v_proj or "
                    "qkv_proj and a forward taking the cache); expected a decoder with attention "
                    "layers"
                )
            plan = {name: (module, AttentionScheme(kv_args)) for name, module in found.items()}
        grouped: dict[str, str] = {}
        for where, scheme in self._attention_groups():
            targets = self.resolve_targets(model, scheme.targets)
            others = [
                f"{name} ({type(m).__name__})" for name, m in targets.items() if name not in found
            ]
            if others:
                raise RecipeError(
                    f"{owner}.{where}: targets {others} are not attention modules; a group with "
                    "only input_activations quantizes attention (queries, keys and values); "
                    "expected attention modules, or add weights to quantize linear layers"
                )
            for name in targets:
                if name in grouped:
                    raise RecipeError(
                        f"{owner}: attention module '{name}' is targeted by {grouped[name]} and "
                        f"{where}; expected one attention group"
                    )
                grouped[name] = where
                args = scheme.input_activations
                plan[name] = (found[name], AttentionScheme(args, queries=args))
        return {name: plan[name] for name in found if name in plan}

    def resolved_schemes(self) -> list[QuantizationScheme]:
        """The schemes this modifier applies, presets and config groups together.

        Returns:
            The schemes, in recipe order.

        Raises:
            RecipeError: for an unknown preset or an invalid config group; the message names
                the field.
        """
        return [scheme for _, scheme in self._labeled_schemes()]

    def plan_layers(self, model: nn.Module) -> dict[str, PendingLayer]:
        """Every layer a scheme targets, with its scheme.

        A borrower plans the ``Linear`` layers of its lender's schemes (less its own
        ``ignore``); its lender plans the rest of its own.

        Args:
            model: the model.

        Returns:
            The layers, by name, each with its scheme as ``settings``.

        Raises:
            RecipeError: when a target is not an ``nn.Linear`` (nor, where the modifier quantizes
                embeddings, a weights-only ``nn.Embedding``), a layer is targeted by two
                schemes, or group sizes do not divide some layers' input features (one error
                listing them all).
        """
        if self._lender is not None:  # its linear layers, less this modifier's ignore
            lent = self._lender._scheme_plan(model)
            return {
                name: layer
                for name, layer in lent.items()
                if isinstance(layer.module, nn.Linear)
                and not any(module_matches(name, layer.module, i) for i in self.ignore)
            }
        plan = self._scheme_plan(model)
        if self._borrower is not None:  # the borrower quantizes those it takes
            taken = self._borrower.plan_layers(model)
            plan = {name: layer for name, layer in plan.items() if name not in taken}
        return plan

    def _scheme_plan(self, model: nn.Module) -> dict[str, PendingLayer]:
        """Every layer this modifier's own schemes target, with its scheme (see
        :meth:`plan_layers`)."""
        owner = type(self).__name__
        plan: dict[str, PendingLayer] = {}
        for scheme in self.resolved_schemes():
            targets = self.resolve_targets(model, scheme.targets)
            layers = quantized_layers(owner, targets, scheme, self.quantizes_embeddings)
            for name, module in layers.items():
                if name in plan:
                    raise RecipeError(
                        f"{owner}: layer '{name}' is targeted by two schemes "
                        f"({plan[name].settings.targets} and {scheme.targets}); expected one"
                    )
                plan[name] = PendingLayer(module, scheme)
        _check_group_sizes(owner, plan)
        return plan

    def _labeled_schemes(self) -> list[tuple[str, QuantizationScheme]]:
        """The layer schemes with the field they come from (``scheme`` or
        ``config_groups.<name>``); attention groups are not among them."""
        return [item for item in self._all_schemes() if not is_attention_scheme(item[1])]

    def _attention_groups(self) -> list[tuple[str, QuantizationScheme]]:
        """The attention groups (:func:`is_attention_scheme`), their arguments checked."""
        groups = [item for item in self._all_schemes() if is_attention_scheme(item[1])]
        for where, scheme in groups:
            try:
                check_attention_args(
                    scheme.input_activations,
                    f"{type(self).__name__}.{where}.input_activations",
                )
            except ValueError as err:
                raise RecipeError(str(err)) from err
        return groups

    def _all_schemes(self) -> list[tuple[str, QuantizationScheme]]:
        """Every scheme with the field it comes from (a borrower: the lender's layer schemes)."""
        if self._lender is not None:
            lender = type(self._lender).__name__
            return [
                (f"{where} (of {lender})", item) for where, item in self._lender._labeled_schemes()
            ]
        name = type(self).__name__
        presets = {self.scheme: self.targets} if isinstance(self.scheme, str) else self.scheme
        labeled = []
        for preset, targets in (presets or {}).items():
            try:
                labeled.append(("scheme", preset_scheme(preset, _as_list(targets))))
            except ValueError as err:
                raise RecipeError(f"{name}.scheme: {err}") from err
        for group, spec in (self.config_groups or {}).items():
            where = f"config_groups.{group}"
            try:
                labeled.append((where, QuantizationScheme.from_dict(spec, where=where)))
            except ValueError as err:
                raise RecipeError(f"{name}.{err}") from err
        return labeled

    def _check_scheme(self, where: str, scheme: QuantizationScheme) -> None:
        """Refuses a scheme no quantizing modifier can apply; subclasses add their limits.

        Args:
            where: the field the scheme comes from.
            scheme: the scheme.

        Raises:
            RecipeError: naming ``<Class>.<where>.<field>``.
        """
        if scheme.weights is None:
            raise RecipeError(
                f"{type(self).__name__}.{where}: scheme for {scheme.targets} has no 'weights'; "
                "expected weight quantization arguments (or only input_activations, for "
                "attention modules)"
            )
        if scheme.weights.strategy == "attn_head":
            raise self.bad_scheme(
                where,
                "weights.strategy",
                "a weight strategy (attn_head is for attention states)",
                "attn_head",
            )
        if scheme.output_activations is not None:
            raise self.bad_scheme(
                where, "output_activations", "None (outputs are not quantized)", "arguments"
            )
        inputs = scheme.input_activations
        if has_static_inputs(scheme) and inputs.strategy != "tensor" and inputs.dynamic is False:
            raise self.bad_scheme(
                where,
                "input_activations.strategy",
                "'tensor' for static input activations (or dynamic=True; 'tensor_group' with "
                "dynamic='local')",
                inputs.strategy,
            )

    def bad_scheme(self, where: str, field: str, expected: str, got: Any) -> RecipeError:
        """The error for a scheme field this modifier cannot apply.

        Args:
            where: the field the scheme comes from (``scheme``, ``config_groups.<name>``).
            field: the scheme's field, e.g. ``weights.observer``.
            expected: what was expected.
            got: the value.

        Returns:
            The error, naming ``<Class>.<where>.<field>``.
        """
        return RecipeError(
            f"{type(self).__name__}.{where}.{field}: expected {expected}, got {got!r}"
        )


def has_static_inputs(scheme: QuantizationScheme) -> bool:
    """Whether ``scheme`` quantizes input activations with calibrated ranges.

    Args:
        scheme: a scheme.

    Returns:
        True for static input activations and for ``dynamic: local`` ones (NVFP4, whose
        per-tensor global scale is calibrated).
    """
    return scheme.input_activations is not None and scheme.input_activations.dynamic is not True


def _check_group_sizes(owner: str, plan: dict[str, PendingLayer]) -> None:
    bad = {
        f"{name} (in_features={layer.module.weight.shape[1]})": args.group_size
        for name, layer in plan.items()
        for args in (layer.settings.weights, layer.settings.input_activations)
        if args is not None
        and args.strategy in ("group", "tensor_group")
        and layer.module.weight.shape[1] % args.group_size
    }
    if bad:
        sizes = sorted(set(bad.values()))
        raise RecipeError(
            f"{owner}: group_size {sizes} does not divide the input features of "
            f"{list(bad)}; expected a group_size that divides them (the groups of weights and "
            "of input activations run along them), or add these layers to ignore"
        )
    warn_about_padded_blocks(
        owner,
        {
            name: (tuple(layer.module.weight.shape), layer.settings.weights.block_structure)
            for name, layer in plan.items()
            if layer.settings.weights is not None and layer.settings.weights.strategy == "block"
        },
    )


def _as_list(targets: str | list[str]) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)
