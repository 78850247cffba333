"""Quantization settings: per-tensor arguments, per-module schemes and named presets.

The fields and their meanings follow the compressed-tensors conventions, so a
scheme written here reads the same as a ``quantization_config`` entry there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from lightning_compress.modifiers.quantization.formats import FORMATS, format_of
from lightning_compress.recipe.errors import did_you_mean

__all__ = [
    "ACTORDERS",
    "DYNAMIC_LOCAL",
    "OBSERVER_KWARGS",
    "OBSERVER_NAMES",
    "PRESET_SCHEMES",
    "STRATEGIES",
    "TYPES",
    "QuantizationArgs",
    "QuantizationScheme",
    "preset_scheme",
]

TYPES = ("int", "float")
STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block", "token", "attn_head")
GROUPED_STRATEGIES = ("group", "tensor_group")
DYNAMIC_STRATEGIES = ("tensor", "group", "token")
DYNAMIC_LOCAL = "local"
"""``dynamic: local``: a calibrated per-tensor global scale, group scales computed per input."""
OBSERVER_NAMES = ("minmax", "moving_average", "mse", "memoryless_minmax", "memoryless_mse")
OBSERVER_ALIASES = {"static_minmax": "minmax"}
"""llm-compressor's names for observers kept here under another name."""
REFUSED_OBSERVERS = {
    "imatrix_mse": "it weighs each weight column's error by the mean square of that input "
    "channel's activations, which needs activation statistics collected for a weight "
    "observer; that is not implemented here: use observer 'mse' (or GPTQ, which weighs "
    "the error by the inputs' full second moments)"
}
MSE_OBSERVERS = ("mse", "memoryless_mse")
OBSERVER_KWARGS = {
    "moving_average": ("averaging_constant",),
    **{name: ("maxshrink", "grid", "norm", "patience", "expand") for name in MSE_OBSERVERS},
}
"""The ``observer_kwargs`` keys each observer honours (with llm-compressor's meanings)."""
ACTORDERS = (None, "weight", "group")
ACTORDER_ALIASES = {"static": "weight", "dynamic": "group", "none": None}
ROLES = ("weights", "input_activations", "output_activations")


def _require(ok: bool, field_name: str, value: Any, expected: str) -> None:
    """Raises a ValueError naming the field, its bad value and what was expected.

    Args:
        ok: whether the value is acceptable.
        field_name: the field being checked.
        value: the value given.
        expected: what the field accepts.

    Raises:
        ValueError: when ``ok`` is false.
    """
    if not ok:
        raise ValueError(f"{field_name}={value!r} is invalid: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keys(d: Any, valid: list[str], where: str) -> None:
    """Checks that ``d`` is a mapping whose keys are all in ``valid``.

    Args:
        d: the mapping read from a config.
        valid: the keys it may hold.
        where: where ``d`` sits in the config, for the error message.

    Raises:
        ValueError: when ``d`` is not a mapping or has unknown keys.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; valid keys are {valid}"
            + did_you_mean(unknown, valid)
        )


def _canonical_actorder(actorder: Any) -> str | None:
    """``actorder`` as None, ``"weight"`` or ``"group"`` (any of its spellings in).

    Raises:
        ValueError: for a value that is no activation ordering.
    """
    if actorder is None or actorder is False:
        return None
    if actorder is True:
        return "group"  # what True meant in compressed-tensors until it was removed
    name = actorder.lower() if isinstance(actorder, str) else actorder
    if name in ACTORDERS:
        return name
    _require(
        name in ACTORDER_ALIASES,
        "actorder",
        actorder,
        f"None, a bool or one of {[*ACTORDERS[1:], *ACTORDER_ALIASES]}",
    )
    return ACTORDER_ALIASES[name]


@dataclass(frozen=True)
class QuantizationArgs:
    """How one tensor (a weight or an activation) is quantized.

    ``token`` quantizes each row over the last dimension; it is meant for
    activations only and needs ``dynamic=True``. This class cannot tell a weight
    from an activation, so :class:`QuantizationScheme` (and other callers that
    know the role) reject ``token`` for weights and ``channel`` for activations.

    Args:
        num_bits: bits per value: 1 to 8 for ``int``; 8 (fp8 e4m3), 6 (fp6 e2m3, MXFP6) or 4
            (fp4 e2m1) for ``float``.
        type: ``"int"`` or ``"float"``.
        symmetric: zero point fixed at 0; ``float`` must be symmetric.
        strategy: which values share a scale: ``"tensor"`` (all), ``"channel"``
            (each output row), ``"group"`` (each ``group_size`` run of the last
            dimension in a row), ``"tensor_group"`` (groups whose scales are stored
            times one per-tensor global scale, NVFP4), ``"block"`` (each
            ``block_structure`` tile of a 2-D weight) or ``"token"`` (each row of an
            activation).
        group_size: values per group; required by and only allowed with ``"group"`` and
            ``"tensor_group"``.
        dynamic: True computes scales on the fly from each input instead of calibrating
            them (allowed with ``"tensor"``, ``"group"`` and ``"token"``); ``"local"``
            (``tensor_group`` activations, NVFP4) calibrates the per-tensor global scale and
            computes the group scales from each input; False calibrates them all.
        observer: how static scales are calibrated: ``"minmax"`` (running extremes;
            llm-compressor's ``"static_minmax"`` is taken as this), ``"memoryless_minmax"``
            (the extremes of the latest tensor only), ``"moving_average"`` (EMA of each
            batch's extremes), ``"mse"`` (range shrunk to minimise the reconstruction
            error, running extremes of those ranges) or ``"memoryless_mse"`` (the latest
            tensor's shrunk range). For weights, seen once, the memoryless ones equal the
            others. None is ``"minmax"``. Ignored when ``dynamic`` is True.
        averaging_constant: EMA weight of the newest batch, in (0, 1].
        scale_dtype: the dtype scales are stored in: None (the weight's dtype),
            ``"float8_e4m3fn"`` (NVFP4) or ``"uint8"`` (E8M0 exponents, the MX formats).
            With ``type`` and ``num_bits`` it picks the format in
            :data:`~lightning_compress.modifiers.quantization.formats.FORMATS`. fp4
            ``tensor_group`` without it is NVFP4 (its only format): it is set to
            ``"float8_e4m3fn"``. A ``"torch."`` prefix is dropped.
        block_structure: ``(rows, columns)`` of a tile sharing a scale; required by and only
            allowed with ``"block"`` (a list is taken as a tuple).
        zp_dtype: the dtype of the zero points, as compressed-tensors names it: None, or
            for asymmetric arguments the dtype zero points are kept in (``"int8"``); any
            dtype name is accepted for symmetric arguments, whose zero points are 0.
        actorder: the column order GPTQ visits a weight in (weights only): None / False
            (natural), ``"weight"`` / ``"static"`` (by decreasing Hessian diagonal, groups
            kept) or ``"group"`` / ``"dynamic"`` / True (groups formed in that order); kept
            as None, ``"weight"`` or ``"group"``. GPTQModifier reads it when its own
            ``actorder`` is left at its default.
        observer_kwargs: settings of the observer, with llm-compressor's names:
            ``averaging_constant`` (``moving_average``); ``maxshrink``, ``grid``, ``norm``,
            ``patience``, ``expand`` (``mse``, ``memoryless_mse``). Kept as sorted
            ``(key, value)`` pairs, so the arguments stay hashable.

    Raises:
        ValueError: when a field is invalid; the message names it.
    """

    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: str = "tensor"
    group_size: int | None = None
    dynamic: bool | str = False
    observer: str = "minmax"
    averaging_constant: float = 0.01
    scale_dtype: str | None = None
    block_structure: tuple[int, int] | None = None
    zp_dtype: str | None = None
    actorder: str | None = None
    observer_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        self._normalize()
        self._check_strategy()
        self._check_type_and_bits()
        self._check_block_structure()
        self._check_dynamic()
        self._check_observer()
        constant = self.averaging_constant
        _require(
            isinstance(constant, (int, float))
            and not isinstance(constant, bool)
            and 0 < constant <= 1,
            "averaging_constant",
            constant,
            "a number in (0, 1]",
        )
        self._check_zp_dtype()

    def _normalize(self) -> None:
        """Puts the spellings compressed-tensors and YAML accept into one form each."""
        normal: dict[str, Any] = {}
        if isinstance(self.block_structure, list):  # as YAML and JSON give it
            normal["block_structure"] = tuple(self.block_structure)
        if isinstance(self.dynamic, str):
            normal["dynamic"] = self.dynamic.lower()
        for name in ("scale_dtype", "zp_dtype"):
            value = getattr(self, name)
            if isinstance(value, str):
                normal[name] = value.removeprefix("torch.")
        nvfp4 = (self.type, self.num_bits, self.strategy) == ("float", 4, "tensor_group")
        if nvfp4 and self.scale_dtype is None:
            normal["scale_dtype"] = "float8_e4m3fn"
        if self.observer is None:
            normal["observer"] = "minmax"
        elif isinstance(self.observer, str):
            normal["observer"] = OBSERVER_ALIASES.get(self.observer, self.observer)
        normal["actorder"] = _canonical_actorder(self.actorder)
        if isinstance(self.observer_kwargs, Mapping):
            _require(
                all(isinstance(key, str) for key in self.observer_kwargs),
                "observer_kwargs",
                self.observer_kwargs,
                "a mapping of str keys",
            )
            normal["observer_kwargs"] = tuple(sorted(self.observer_kwargs.items()))
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    def _check_dynamic(self) -> None:
        dynamic = self.dynamic
        _require(
            isinstance(dynamic, bool) or dynamic == DYNAMIC_LOCAL,
            "dynamic",
            dynamic,
            f"True, False or {DYNAMIC_LOCAL!r}",
        )
        if dynamic is True:
            _require(
                self.strategy in DYNAMIC_STRATEGIES,
                "strategy",
                self.strategy,
                f"one of {DYNAMIC_STRATEGIES} when dynamic=True ('tensor_group' takes "
                f"dynamic={DYNAMIC_LOCAL!r}: its global scale is calibrated)",
            )
        elif dynamic == DYNAMIC_LOCAL:
            _require(
                self.strategy == "tensor_group",
                "strategy",
                self.strategy,
                f"'tensor_group' when dynamic={DYNAMIC_LOCAL!r} (only NVFP4 has a global "
                "scale to calibrate)",
            )

    def _check_observer(self) -> None:
        observer = self.observer
        if observer in REFUSED_OBSERVERS:
            raise ValueError(
                f"observer={observer!r} is not supported: {REFUSED_OBSERVERS[observer]}"
            )
        _require(
            observer in OBSERVER_NAMES,
            "observer",
            observer,
            f"one of {OBSERVER_NAMES} (or llm-compressor's {list(OBSERVER_ALIASES)})",
        )
        _require(
            self.dynamic != DYNAMIC_LOCAL or observer not in MSE_OBSERVERS,
            "observer",
            observer,
            f"a min-max observer with dynamic={DYNAMIC_LOCAL!r}: only the global scale is "
            "calibrated, from the largest magnitude seen",
        )
        _require(
            isinstance(self.observer_kwargs, tuple),
            "observer_kwargs",
            self.observer_kwargs,
            "a mapping",
        )
        kwargs = dict(self.observer_kwargs)
        honoured = OBSERVER_KWARGS.get(observer, ())
        unknown = sorted(set(kwargs) - set(honoured))
        if unknown:
            hint = ""
            if observer == "minmax" and "averaging_constant" in unknown:
                hint = (
                    "; 'minmax' keeps running extremes here (llm-compressor's 'static_minmax'): "
                    "for llm-compressor's moving-average 'minmax' write observer: moving_average"
                )
            raise ValueError(
                f"observer_kwargs={kwargs!r} is invalid: observer {observer!r} does not use "
                f"{unknown}; it takes {list(honoured)}{hint}"
            )
        for key, value in kwargs.items():
            _require(
                isinstance(value, (int, float)) and not isinstance(value, bool),
                f"observer_kwargs.{key}",
                value,
                "a number",
            )
        if "averaging_constant" in kwargs:
            constant = kwargs["averaging_constant"]
            _require(
                self.averaging_constant in (0.01, constant),
                "averaging_constant",
                self.averaging_constant,
                f"the observer_kwargs' averaging_constant={constant!r} (set it once)",
            )
            object.__setattr__(self, "averaging_constant", constant)

    def _check_zp_dtype(self) -> None:
        zp_dtype = self.zp_dtype
        if zp_dtype is None:
            return
        _require(
            isinstance(zp_dtype, str) and isinstance(getattr(torch, zp_dtype, None), torch.dtype),
            "zp_dtype",
            zp_dtype,
            "None or the name of a torch dtype (e.g. 'int8')",
        )
        if self.symmetric:
            return  # zero points are 0 in every dtype
        kept_in = format_of(self.type, self.num_bits, self.scale_dtype).grid.storage_dtype
        _require(
            getattr(torch, zp_dtype) == kept_in,
            "zp_dtype",
            zp_dtype,
            f"None or {str(kept_in).removeprefix('torch.')!r}, the dtype asymmetric zero "
            "points are kept in",
        )

    def _check_type_and_bits(self) -> None:
        _require(self.type in TYPES, "type", self.type, f"one of {TYPES}")
        _require(isinstance(self.symmetric, bool), "symmetric", self.symmetric, "a bool")
        if self.type == "int":
            _require(
                _is_int(self.num_bits) and 1 <= self.num_bits <= 8,
                "num_bits",
                self.num_bits,
                "an int in 1..8 for type='int'",
            )
        else:
            _require(self.symmetric, "symmetric", self.symmetric, "True for type='float'")
        scale_dtypes = list(dict.fromkeys(f.scale_dtype for f in FORMATS if f.type == self.type))
        _require(
            self.scale_dtype in scale_dtypes,
            "scale_dtype",
            self.scale_dtype,
            f"one of {scale_dtypes} for type={self.type!r}",
        )
        bits = [
            bits
            for f in FORMATS
            if (f.type, f.scale_dtype) == (self.type, self.scale_dtype)
            for bits in f.num_bits
        ]
        _require(
            _is_int(self.num_bits) and self.num_bits in bits,
            "num_bits",
            self.num_bits,
            f"one of {bits} for type={self.type!r} with scale_dtype={self.scale_dtype!r}",
        )
        quant_format = format_of(self.type, self.num_bits, self.scale_dtype)
        _require(
            self.strategy in quant_format.strategies,
            "strategy",
            self.strategy,
            f"one of {quant_format.strategies} for the {quant_format.name} format",
        )
        _require(
            quant_format.group_size in (None, self.group_size),
            "group_size",
            self.group_size,
            f"{quant_format.group_size} for the {quant_format.name} format",
        )

    def _check_block_structure(self) -> None:
        blocks = self.block_structure
        if self.strategy == "block":
            _require(
                isinstance(blocks, tuple)
                and len(blocks) == 2
                and all(_is_int(size) and size > 0 for size in blocks),
                "block_structure",
                blocks,
                "two positive ints [rows, columns] for strategy='block'",
            )
        else:
            _require(
                blocks is None,
                "block_structure",
                blocks,
                f"None for strategy={self.strategy!r} (block_structure needs strategy='block')",
            )

    def _check_strategy(self) -> None:
        _require(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {STRATEGIES}")
        if self.strategy in GROUPED_STRATEGIES:
            _require(
                _is_int(self.group_size) and self.group_size > 0,
                "group_size",
                self.group_size,
                f"a positive int for strategy={self.strategy!r}",
            )
        else:
            _require(
                self.group_size is None,
                "group_size",
                self.group_size,
                f"None for strategy={self.strategy!r} (group_size needs strategy='group' "
                "or 'tensor_group')",
            )
        _require(
            self.strategy != "token" or self.dynamic is True,
            "dynamic",
            self.dynamic,
            "True for strategy='token' (per-token scales cannot be calibrated)",
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "quantization_args") -> QuantizationArgs:
        """Builds arguments from a config mapping.

        Args:
            d: field names to values; missing fields take their defaults.
            where: where ``d`` sits in the config, e.g. ``"config_groups.group_0.weights"``.

        Returns:
            The validated arguments.

        Raises:
            ValueError: on unknown keys or invalid values; the message starts with ``where``.
        """
        _check_keys(d, [f.name for f in fields(cls)], where)
        try:
            return cls(**d)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields that differ from their defaults (``block_structure`` as a list
        and ``observer_kwargs`` as a mapping, as YAML writes them); ``from_dict`` inverts it."""
        out = {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in fields(self)
            if (value := getattr(self, f.name)) != f.default
        }
        if "observer_kwargs" in out:
            out["observer_kwargs"] = dict(self.observer_kwargs)
        return out


@dataclass(frozen=True)
class QuantizationScheme:
    """How the modules matched by ``targets`` quantize their weights and activations.

    Args:
        targets: module names, class names or ``re:`` patterns the scheme applies to.
        weights: arguments for the weight, or None to leave it unquantized.
        input_activations: arguments for the module's input, or None.
        output_activations: arguments for the module's output, or None.

    Raises:
        ValueError: on empty targets, ``token`` weights or ``channel`` activations.
    """

    targets: list[str]
    weights: QuantizationArgs | None
    input_activations: QuantizationArgs | None
    output_activations: QuantizationArgs | None = None

    def __post_init__(self) -> None:
        _require(
            isinstance(self.targets, list)
            and bool(self.targets)
            and all(isinstance(t, str) for t in self.targets),
            "targets",
            self.targets,
            "a non-empty list of str",
        )
        for role in ROLES:
            args = getattr(self, role)
            _require(
                args is None or isinstance(args, QuantizationArgs),
                role,
                args,
                "QuantizationArgs or None",
            )
        if self.weights is not None:
            _require(
                self.weights.strategy != "token",
                "weights.strategy",
                "token",
                "'tensor', 'channel' or 'group' (token is for activations)",
            )
            _require(
                self.weights.dynamic != DYNAMIC_LOCAL,
                "weights.dynamic",
                DYNAMIC_LOCAL,
                f"False ({DYNAMIC_LOCAL!r} is for activations)",
            )
        for role in ROLES[1:]:
            args = getattr(self, role)
            _require(
                args is None or args.strategy not in ("channel", "block"),
                f"{role}.strategy",
                None if args is None else args.strategy,
                "'tensor', 'group' or 'token' (channel and block are for weights)",
            )
            _require(
                args is None or args.actorder is None,
                f"{role}.actorder",
                None if args is None else args.actorder,
                "None (activation ordering is a setting of the weights)",
            )

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], where: str = "quantization_scheme"
    ) -> QuantizationScheme:
        """Builds a scheme from a config mapping.

        Args:
            d: ``targets`` plus, optionally, one argument mapping per role.
            where: where ``d`` sits in the config, e.g. ``"config_groups.group_0"``.

        Returns:
            The validated scheme.

        Raises:
            ValueError: on unknown keys or invalid values; the message names where.
        """
        _check_keys(d, ["targets", *ROLES], where)
        roles = {
            role: None
            if d.get(role) is None
            else QuantizationArgs.from_dict(d[role], f"{where}.{role}")
            for role in ROLES
        }
        try:
            return cls(targets=d.get("targets"), **roles)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Returns ``targets`` and each quantized role's ``to_dict``; ``from_dict`` inverts it."""
        out: dict[str, Any] = {"targets": list(self.targets)}
        for role in ROLES:
            args = getattr(self, role)
            if args is not None:
                out[role] = args.to_dict()
        return out


_INT8_TOKEN_DYNAMIC = QuantizationArgs(num_bits=8, strategy="token", dynamic=True)


def _int_weights_and_activations(weight_bits: int, act_bits: int) -> dict[str, QuantizationArgs]:
    """compressed-tensors' ``W<w>A<a>`` int presets: symmetric int weights in groups of 128
    and, below 16 bits, dynamic per-token int activations."""
    roles = {"weights": QuantizationArgs(num_bits=weight_bits, strategy="group", group_size=128)}
    if act_bits < 16:
        roles["input_activations"] = QuantizationArgs(
            num_bits=act_bits, strategy="token", dynamic=True
        )
    return roles


_INT_FAMILY = {
    f"W{weight_bits}A{act_bits}": _int_weights_and_activations(weight_bits, act_bits)
    for weight_bits in range(2, 9)
    for act_bits in (4, 8, 16)
    if weight_bits <= act_bits
}
"""W2A4 ... W8A16 as compressed-tensors 0.20 defines them (its W4A8, W4A16 and W8A16 included;
its W8A8 is another preset, with per-channel weights)."""

_NVFP4_WEIGHTS = QuantizationArgs(
    num_bits=4, type="float", strategy="tensor_group", group_size=16, scale_dtype="float8_e4m3fn"
)
_MXFP4_WEIGHTS = QuantizationArgs(
    num_bits=4, type="float", strategy="group", group_size=32, scale_dtype="uint8"
)
_MXFP6_WEIGHTS = QuantizationArgs(
    num_bits=6, type="float", strategy="group", group_size=32, scale_dtype="uint8"
)
_MXFP8_WEIGHTS = QuantizationArgs(
    type="float", strategy="group", group_size=32, scale_dtype="uint8"
)
_W8A8 = {
    "weights": QuantizationArgs(num_bits=8, strategy="channel"),
    "input_activations": _INT8_TOKEN_DYNAMIC,
}

PRESET_SCHEMES: dict[str, dict[str, QuantizationArgs]] = {
    "W8A16": _INT_FAMILY["W8A16"],
    "W4A16": _INT_FAMILY["W4A16"],
    "W4A16_ASYM": {
        "weights": QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=128)
    },
    "W8A8": _W8A8,
    "INT8": _W8A8,
    "W4A8": _INT_FAMILY["W4A8"],
    "FP8": {
        "weights": QuantizationArgs(type="float", strategy="tensor"),
        "input_activations": QuantizationArgs(type="float", strategy="tensor"),
    },
    "FP8_DYNAMIC": {
        "weights": QuantizationArgs(type="float", strategy="channel"),
        "input_activations": QuantizationArgs(type="float", strategy="token", dynamic=True),
    },
    "W4AFP8": {
        "weights": QuantizationArgs(num_bits=4, strategy="group", group_size=128),
        "input_activations": QuantizationArgs(type="float", strategy="token", dynamic=True),
    },
    "NVFP4A16": {"weights": _NVFP4_WEIGHTS},
    "NVFP4": {
        "weights": _NVFP4_WEIGHTS,
        "input_activations": QuantizationArgs(
            num_bits=4,
            type="float",
            strategy="tensor_group",
            group_size=16,
            dynamic=DYNAMIC_LOCAL,
            scale_dtype="float8_e4m3fn",
        ),
    },
    "FP8_BLOCK": {
        "weights": QuantizationArgs(type="float", strategy="block", block_structure=(128, 128)),
        "input_activations": QuantizationArgs(
            type="float", strategy="group", group_size=128, dynamic=True
        ),
    },
    "MXFP4A16": {"weights": _MXFP4_WEIGHTS},
    "MXFP4": {
        "weights": _MXFP4_WEIGHTS,
        "input_activations": dataclasses.replace(_MXFP4_WEIGHTS, dynamic=True),
    },
    "MXFP4XFP8": {
        "weights": _MXFP4_WEIGHTS,
        "input_activations": QuantizationArgs(
            type="float", strategy="group", group_size=128, dynamic=True
        ),
    },
    "MXFP6A16": {"weights": _MXFP6_WEIGHTS},
    "MXFP6A8": {
        "weights": _MXFP6_WEIGHTS,
        "input_activations": dataclasses.replace(_MXFP8_WEIGHTS, dynamic=True),
    },
    "MXFP8A16": {"weights": _MXFP8_WEIGHTS},
    "MXFP8": {
        "weights": _MXFP8_WEIGHTS,
        "input_activations": dataclasses.replace(_MXFP8_WEIGHTS, dynamic=True),
    },
    **{
        name: roles
        for name, roles in _INT_FAMILY.items()
        if name not in ("W8A16", "W4A16", "W4A8", "W8A8")
    },
}
"""Preset name (upper case) to the arguments of each quantized role."""


def preset_scheme(name: str, targets: list[str]) -> QuantizationScheme:
    """Builds the named preset scheme for ``targets``.

    Args:
        name: a key of :data:`PRESET_SCHEMES`, in any case (``"w4a16"`` works).
        targets: what the scheme applies to, e.g. ``["Linear"]``.

    Returns:
        The scheme; roles a preset leaves out are None.

    Raises:
        ValueError: when the name is not a preset; the message lists the presets and the
            closest ones.
    """
    roles = PRESET_SCHEMES.get(name.upper())
    if roles is None:
        raise ValueError(
            f"unknown preset scheme {name!r}; presets are {list(PRESET_SCHEMES)}"
            + did_you_mean([name], PRESET_SCHEMES, ignore_case=True)
        )
    return QuantizationScheme(targets=list(targets), **{role: roles.get(role) for role in ROLES})
