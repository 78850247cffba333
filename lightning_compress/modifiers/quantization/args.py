"""Quantization settings: per-tensor arguments, per-module schemes and named presets.

The fields and their meanings follow the compressed-tensors conventions, so a
scheme written here reads the same as a ``quantization_config`` entry there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from lightning_compress.modifiers.quantization.formats import FORMATS, format_of
from lightning_compress.recipe.errors import did_you_mean

__all__ = [
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
OBSERVER_NAMES = ("minmax", "moving_average", "mse")
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


@dataclass(frozen=True)
class QuantizationArgs:
    """How one tensor (a weight or an activation) is quantized.

    ``token`` quantizes each row over the last dimension; it is meant for
    activations only and needs ``dynamic=True``. This class cannot tell a weight
    from an activation, so :class:`QuantizationScheme` (and other callers that
    know the role) reject ``token`` for weights and ``channel`` for activations.

    Args:
        num_bits: bits per value: 1 to 8 for ``int``; 8 (fp8 e4m3) or 4 (fp4 e2m1) for
            ``float``.
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
        dynamic: compute scales on the fly from each input instead of calibrating
            them; allowed with ``"tensor"``, ``"group"`` and ``"token"``.
        observer: how static scales are calibrated: ``"minmax"`` (running
            extremes), ``"moving_average"`` (EMA of each batch's extremes) or
            ``"mse"`` (range shrunk to minimise the reconstruction error).
            Ignored when ``dynamic``.
        averaging_constant: EMA weight of the newest batch, in (0, 1].
        scale_dtype: the dtype scales are stored in: None (the weight's dtype),
            ``"float8_e4m3fn"`` (NVFP4) or ``"uint8"`` (E8M0 exponents, the MX formats).
            With ``type`` and ``num_bits`` it picks the format in
            :data:`~lightning_compress.modifiers.quantization.formats.FORMATS`.
        block_structure: ``(rows, columns)`` of a tile sharing a scale; required by and only
            allowed with ``"block"`` (a list is taken as a tuple).

    Raises:
        ValueError: when a field is invalid; the message names it.
    """

    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: str = "tensor"
    group_size: int | None = None
    dynamic: bool = False
    observer: str = "minmax"
    averaging_constant: float = 0.01
    scale_dtype: str | None = None
    block_structure: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.block_structure, list):  # as YAML and JSON give it
            object.__setattr__(self, "block_structure", tuple(self.block_structure))
        self._check_strategy()
        self._check_type_and_bits()
        self._check_block_structure()
        _require(isinstance(self.dynamic, bool), "dynamic", self.dynamic, "a bool")
        _require(
            not self.dynamic or self.strategy in DYNAMIC_STRATEGIES,
            "strategy",
            self.strategy,
            f"one of {DYNAMIC_STRATEGIES} when dynamic=True",
        )
        _require(
            self.observer in OBSERVER_NAMES, "observer", self.observer, f"one of {OBSERVER_NAMES}"
        )
        constant = self.averaging_constant
        _require(
            isinstance(constant, (int, float))
            and not isinstance(constant, bool)
            and 0 < constant <= 1,
            "averaging_constant",
            constant,
            "a number in (0, 1]",
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
            self.strategy != "token" or self.dynamic,
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
        """Returns the fields that differ from their defaults (tuples as lists, as YAML writes
        them); ``from_dict`` inverts it."""
        return {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in fields(self)
            if (value := getattr(self, f.name)) != f.default
        }


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
        for role in ROLES[1:]:
            args = getattr(self, role)
            _require(
                args is None or args.strategy not in ("channel", "block"),
                f"{role}.strategy",
                None if args is None else args.strategy,
                "'tensor', 'group' or 'token' (channel and block are for weights)",
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
    for weight_bits in range(2, 8)
    for act_bits in (4, 8, 16)
    if weight_bits <= act_bits
}
"""W2A4 ... W7A16 as compressed-tensors 0.20 defines them (its W4A8 and W4A16 included)."""

PRESET_SCHEMES: dict[str, dict[str, QuantizationArgs]] = {
    "W8A16": {"weights": QuantizationArgs(num_bits=8, strategy="channel")},
    "W4A16": {"weights": QuantizationArgs(num_bits=4, strategy="group", group_size=128)},
    "W4A16_ASYM": {
        "weights": QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=128)
    },
    "W8A8": {
        "weights": QuantizationArgs(num_bits=8, strategy="channel"),
        "input_activations": _INT8_TOKEN_DYNAMIC,
    },
    "W4A8": {
        "weights": QuantizationArgs(num_bits=4, strategy="group", group_size=128),
        "input_activations": _INT8_TOKEN_DYNAMIC,
    },
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
    "NVFP4A16": {
        "weights": QuantizationArgs(
            num_bits=4,
            type="float",
            strategy="tensor_group",
            group_size=16,
            scale_dtype="float8_e4m3fn",
        )
    },
    "FP8_BLOCK": {
        "weights": QuantizationArgs(type="float", strategy="block", block_structure=(128, 128)),
        "input_activations": QuantizationArgs(
            type="float", strategy="group", group_size=128, dynamic=True
        ),
    },
    "MXFP4A16": {
        "weights": QuantizationArgs(
            num_bits=4, type="float", strategy="group", group_size=32, scale_dtype="uint8"
        )
    },
    "MXFP8A16": {
        "weights": QuantizationArgs(
            type="float", strategy="group", group_size=32, scale_dtype="uint8"
        )
    },
    **{name: roles for name, roles in _INT_FAMILY.items() if name not in ("W4A8", "W4A16")},
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
