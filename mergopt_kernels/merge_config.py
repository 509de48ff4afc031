"""The typed configuration of a merge from disk, shared by the command line and the Python API.

A ``MergeConfig`` has mergekit's layout (``merge_method``, ``base_model``, ``models`` with
per-model ``parameters``, shared ``parameters``) and is validated by pydantic as mergekit's own
config is, with the same coercions: ``'false'``, ``'no'``, ``'off'`` and ``0`` read as ``False``
for a switch, ``'0.3'`` as ``0.3`` for a number. Everything else that does not fit (a list where
a name is expected, ``null`` for a model, a number for a path, an unknown key, a non-finite
number) is a ``ValueError`` naming the key (``models[1].parameters.density: ...``).

Build one from a file (``MergeConfig.from_file``), from keyword arguments in this package's
option names (``MergeConfig.from_options``, what ``merge_io.merge_checkpoints`` and the command's
flags use), or directly (``MergeConfig(merge_method="ties", conventions="mergekit", ...)``);
``merge_io.merge_from_config`` runs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Union

import pydantic
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from .validation import MASK64, check_choice

__all__ = ["MergeConfig"]

# mergekit's method names and ours -> (our method, DARE followed by TIES)
METHOD_ALIASES = {"weight_average": ("weight_average", False), "linear": ("weight_average", False),
                  "task_arithmetic": ("task_arithmetic", False), "ties": ("ties", False),
                  "dare": ("dare", False), "dare_linear": ("dare", False), "dare_ties": ("dare", True)}
PER_MODEL = ("weight", "density", "drop_rate")  # options a model's parameters may set

Number = Annotated[float, Field(allow_inf_nan=False)]
Numbers = Union[Number, list[Number]]
_STRICT = ConfigDict(extra="forbid", frozen=True)


class ModelParameters(BaseModel):
    """Options of one model, overriding the shared ones."""

    model_config = _STRICT
    weight: Number | None = None
    density: Number | None = None
    drop_rate: Number | None = None


class ModelEntry(BaseModel):
    """One expert: its path (folder or ``.safetensors`` file) and its options."""

    model_config = _STRICT
    model: Annotated[str, Field(min_length=1)]
    parameters: ModelParameters = ModelParameters()


class Parameters(BaseModel):
    """Shared options (``merging.merge_spec`` and ``merge_plan`` for each one's meaning)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    scaling: Number | None = Field(None, validation_alias=AliasChoices("lambda", "scaling"))
    weight: Number | None = None
    density: Numbers | None = None
    drop_rate: Numbers | None = None
    normalize: bool | None = None
    per_tensor: bool | None = None
    exact_count: bool | None = None
    count_rounding: Literal["nearest", "down"] | None = None
    zero_sign: Literal["majority", "positive"] | None = None
    rescale: Literal["inverse", "l1", "none"] | bool | None = None
    seed: Annotated[int, Field(ge=0, le=MASK64)] | None = None  # validation.check_seed's range
    ties: bool | None = None
    keys: Literal["strict", "intersection", "union"] | None = None
    non_float: Literal["error", "base"] | None = None
    promote_dtypes: bool | None = None
    allow_non_finite: bool | None = None

    @pydantic.model_validator(mode="before")
    @classmethod
    def _one_name_for_lambda(cls, data):
        if isinstance(data, dict) and "lambda" in data and "scaling" in data:
            raise ValueError("give lambda or scaling, not both")
        return data


class MergeConfig(BaseModel):
    """A merge: method, conventions, base, experts and options (mergekit's layout)."""

    model_config = _STRICT
    merge_method: Literal[tuple(METHOD_ALIASES)]
    conventions: Literal["paper", "mergekit"] = "paper"
    base_model: Annotated[str, Field(min_length=1)] | None = None
    models: Annotated[list[ModelEntry], Field(min_length=1)]
    parameters: Parameters = Parameters()

    @pydantic.model_validator(mode="after")
    def _per_model_options_for_all_or_none(self):
        for key in ("density", "drop_rate"):
            values = [getattr(m.parameters, key) for m in self.models]
            if None in values and any(v is not None for v in values):
                raise ValueError(f"models[{values.index(None)}].parameters.{key} is not set: {key} is set for some "
                                 f"models only; set it for every model or in parameters")
        return self

    @classmethod
    def from_dict(cls, data, where: str = "config") -> MergeConfig:
        """Validate ``data`` (parsed YAML/JSON); errors are ``ValueError``s naming ``where`` and the key."""
        try:
            return cls.model_validate(data)
        except pydantic.ValidationError as error:
            raise ValueError(f"{where}: " + "; ".join(_describe(e) for e in error.errors())) from None

    @classmethod
    def from_file(cls, path) -> MergeConfig:
        """Read a YAML or JSON config; relative model paths are taken relative to its folder."""
        path = Path(path)
        text = path.read_text()
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except ImportError:
            raise ValueError(f"config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                             f"or write the config as .json") from None
        except Exception as error:  # yaml.YAMLError or json.JSONDecodeError, each with its position
            raise ValueError(f"config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} "
                             f"({error})") from None
        config = cls.from_dict(data, f"config {path}")
        folder = path.parent
        models = [m.model_copy(update={"model": str(folder / m.model)}) for m in config.models]
        base = str(folder / config.base_model) if config.base_model is not None else None
        return config.model_copy(update={"models": models, "base_model": base})

    @classmethod
    def from_options(cls, method: str, base, experts: Sequence, **options) -> MergeConfig:
        """The config of ``merge_io.merge_checkpoints(method, base, experts, out, **options)``.

        ``options`` are in this package's names (``merging.merge_spec``'s and ``keys``,
        ``non_float``, ``promote_dtypes``, ``allow_non_finite``); ``weights`` and per-expert
        ``density`` / ``drop_rate`` lists become the models' parameters.
        """
        import os

        if isinstance(experts, (str, os.PathLike)) or not isinstance(experts, Sequence) or not experts:
            raise ValueError("experts must be a non-empty list of checkpoint paths")
        per_model = [{} for _ in experts]
        shared = dict(options)
        weights = shared.pop("weights", None)
        if weights is not None:
            if isinstance(weights, str) or not isinstance(weights, Sequence) or len(weights) != len(experts):
                raise ValueError(f"weights must be a list of {len(experts)} numbers (one per expert), got {weights!r}")
            for params, weight in zip(per_model, weights):
                params["weight"] = weight
        if "merge_func" in shared:
            merge_func = shared.pop("merge_func")
            shared["normalize"] = check_choice("merge_func", merge_func, ("mean", "sum")) == "mean"
        models = [{"model": os.fspath(path), "parameters": params} for path, params in zip(experts, per_model)]
        data = {"merge_method": method, "base_model": os.fspath(base) if base is not None else None,
                "models": models, "parameters": shared}
        return cls.from_dict(data, "options")

    def resolve(self) -> tuple[str, str | None, list[str], dict]:
        """(method, base path, expert paths, options for ``merging.merge_spec`` and ``merge_plan``).

        Unset options are left out (the method's defaults apply), except under ``conventions:
        mergekit``, which sets mergekit 0.1.5's defaults for the options the method uses.
        """
        method, dare_ties = METHOD_ALIASES[self.merge_method]
        options = _mergekit_defaults(method, dare_ties) if self.conventions == "mergekit" else {}
        shared = self.parameters.model_dump(exclude_none=True)
        options.update(shared)
        if dare_ties:
            options["ties"] = True
        if "normalize" in options:
            options["merge_func"] = "mean" if options.pop("normalize") else "sum"
        if isinstance(options.get("rescale"), bool):
            options["rescale"] = "l1" if options["rescale"] else "none"
        shared_weight = options.pop("weight", None)
        weights = [m.parameters.weight if m.parameters.weight is not None else shared_weight for m in self.models]
        if any(w is not None for w in weights):
            options["weights"] = [1.0 if w is None else w for w in weights]
        for key in ("density", "drop_rate"):
            values = [getattr(m.parameters, key) for m in self.models]
            if all(v is not None for v in values):
                options[key] = values
        if self.conventions == "mergekit" and method == "dare" and "density" in options:
            density = options.pop("density")
            options["drop_rate"] = [1.0 - d for d in density] if isinstance(density, list) else 1.0 - density
            if dare_ties:
                options["density"] = 1.0
        return method, self.base_model, [m.model for m in self.models], options


def _mergekit_defaults(method: str, dare_ties: bool) -> dict:
    """mergekit 0.1.5's defaults of the options ``method`` uses."""
    if method == "weight_average":
        return {}
    defaults = {"scaling": 1.0}
    if method == "ties" or dare_ties:
        # mergekit keeps exactly int(density * n) entries per tensor (its argsort's top k) and
        # elects +1 where the weighted sum is 0
        defaults.update(per_tensor=True, exact_count=True, merge_func="sum" if dare_ties else "mean",
                        count_rounding="down", zero_sign="positive")
    if method != "task_arithmetic":
        defaults["density"] = 1.0  # for DARE the keep fraction, made a drop rate by ``resolve``
    if method == "dare":
        defaults["rescale"] = "l1"
    return defaults


def _describe(error: dict) -> str:
    """``models[1].parameters.density: Input should be ...`` from one pydantic error."""
    where = ""
    for part in error["loc"]:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in ("float", "list[float]", "bool", "int", "str", "literal['inverse','l1','none']"):
            continue  # the union member pydantic tried
        else:
            where += f".{part}" if where else str(part)
    if error["type"] == "value_error":  # raised by a validator here: its message names the keys
        return str(error["ctx"]["error"])
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{where or 'the top level'}: {error['msg']}{shown}"
