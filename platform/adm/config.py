"""Typed configs: dataclasses filled from YAML, dicts or command-line strings, checked by pydantic.

Every config of the platform (training, data, shard writing, sampling, serving, the
evaluation's feature job, the quickstart) is a `config_class`: a pydantic dataclass that refuses
unknown keys and converts what YAML and command lines give ("4" -> 4, "1e-4" -> 1e-4, "true" ->
True). A bound on one field is a pydantic constraint in its annotation (`PositiveInt`,
`Annotated[float, Field(ge=0, allow_inf_nan=False)]`, `Literal[...]`); only rules that span
fields live in ``__post_init__``. `from_dict(Cls, data)` builds one and turns pydantic's errors
into one `ConfigError` naming the dotted key and what is wrong, before any Ray worker starts.
`apply_overrides(data, ["optim.lr=3e-4", ...])` applies command-line `key=value` overrides
(values parsed as YAML scalars) to the raw dict first.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, Literal, Mapping, Sequence, TypeVar

import pydantic
import yaml
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

# How the networks run: float32, or bfloat16 / float16 autocast (fp16 training adds a grad
# scaler). The one definition every config uses.
Precision = Literal["fp32", "bf16", "fp16"]
# Sampling's settings also take "auto": the fastest measured choice for the device the networks
# run on (`adm.precision`, `adm.stage.resolve_fast_path`). Compile: `torch.compile` the networks, or not, or "auto".
SamplingPrecision = Literal["auto", "fp32", "bf16", "fp16"]
CompileSetting = bool | Literal["auto"]


def _absolute(uri: str) -> str:
    from .storage import absolute

    return absolute(uri)


# A local path or s3:// URI that Ray workers read or write: made absolute where the config is
# built (on the driver: workers run in other directories, on other nodes).
Location = Annotated[str, pydantic.AfterValidator(_absolute)]
# The same, optional: None or "" (what a command line can give) for none.
OptionalLocation = Annotated[Location | None,
                             pydantic.BeforeValidator(lambda v: None if v == "" else v)]


class UserError(Exception):
    """A problem with what the user gave a job (a config, a file, a flag): the jobs report it
    in one ``error: ...`` line and exit with status 2 (`adm.runtime.run_job`), no traceback."""


class ConfigError(UserError, ValueError):
    """A config key that is unknown, missing, of the wrong type or out of range."""


class InputError(UserError, ValueError):
    """Something the user gave that cannot be used: a missing or unreadable source, a
    compressed tar, a bad labels file, an output folder holding another dataset, an image set
    that cannot be evaluated. The message names the input and says what is wrong in one line."""


def config_class(cls: type[T] | None = None, *, frozen: bool = False):
    """Decorator: `cls` as a pydantic dataclass that refuses unknown keys. Its
    ``__post_init__`` holds the checks across fields (raise ConfigError naming the key).
    Built directly (``Cls(...)``, ``dataclasses.replace``) it raises a ConfigError too."""
    options = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    def wrap(c: type[T]) -> type[T]:
        checked = _pydantic_dataclass(c, config=options, frozen=frozen)
        init = checked.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as e:
                raise ConfigError(_message(checked, e, "")) from None

        checked.__init__ = __init__
        return checked

    return wrap if cls is None else wrap(cls)


# pydantic's error types -> the words a config error uses.
_EXPECTED = {"int_parsing": "int", "int_type": "int", "int_from_float": "int",
             "float_parsing": "float", "float_type": "float", "bool_parsing": "bool",
             "bool_type": "bool", "string_type": "str", "dict_type": "a mapping",
             "dataclass_type": "a mapping", "list_type": "a list", "tuple_type": "a list"}
# pydantic's bound errors -> (the constraint's name in the error's context, its operator).
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _fields_at(cls: type, loc: tuple) -> list[str]:
    """The field names of the (nested) dataclass at `loc` in `cls`."""
    for part in loc:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(part, None)
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _named_loc(cls: type, loc: tuple) -> tuple:
    """`loc` with a positional argument's index (a config class built positionally, as a job
    builds one from its flags) replaced by the field's name, so the message names the key."""
    if loc and isinstance(loc[0], int) and dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
        if loc[0] < len(names):
            return (names[loc[0]], *loc[1:])
    return loc


def _message(cls: type, e: pydantic.ValidationError, where: str) -> str:
    """One line for the first error of `e` (unknown keys all together), keys dotted."""
    errors = e.errors(include_url=False)
    prefix = f"{where}." if where else ""
    unknown = [err for err in errors if err["type"] in ("unexpected_keyword_argument",
                                                        "extra_forbidden")]
    if unknown:
        keys = ", ".join(prefix + ".".join(map(str, err["loc"])) for err in unknown)
        parent = unknown[0]["loc"][:-1]
        known = ", ".join(_fields_at(cls, parent))
        scope = ".".join([where, *map(str, parent)]).strip(".") or "the top level"
        return f"unknown config key(s): {keys} (known in {scope}: {known})"
    err = errors[0]
    key = prefix + ".".join(str(p) for p in _named_loc(cls, err["loc"]))
    if err["type"] == "missing_keyword_argument" or err["type"] == "missing":
        return f"missing config key {key}"
    if err["type"] == "value_error":  # a check of ours: its message names the key already
        return str(err.get("ctx", {}).get("error", err["msg"]))
    if err["type"] == "literal_error":
        return f"{key}: {err['input']!r} is not one of {err['ctx']['expected']}"
    if err["type"] in _BOUNDS:
        name, op = _BOUNDS[err["type"]]
        bound = err["ctx"][name]  # a float field's bound comes as a float: 0 reads better
        what = "positive" if (op, bound) == (">", 0) else f"{op} {bound:g}"
        return f"{key}: must be {what}, got {err['input']!r}"
    if err["type"] == "finite_number":
        return f"{key}: must be finite, got {err['input']!r}"
    if err["type"] == "too_short":
        return f"{key}: must hold at least {err['ctx']['min_length']} value(s), got " \
               f"{err['input']!r}"
    what = _EXPECTED.get(err["type"])
    detail = f"expected {what}" if what else err["msg"]
    return f"{key}: {detail}, got {err['input']!r}"


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build config class `cls` from `data` (see the module docstring), or a ConfigError."""
    try:
        return pydantic.TypeAdapter(cls).validate_python(dict(data or {}))
    except pydantic.ValidationError as e:
        raise ConfigError(_message(cls, e, where)) from None


def to_dict(config: Any) -> dict:
    """A plain dict (YAML-ready) of a dataclass config."""
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `dotted.key=value` overrides to a raw config dict (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, Mapping) else {}
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path_or_text: str) -> dict:
    """A YAML mapping from a file path (or from YAML text when it contains a newline)."""
    if "\n" in path_or_text:
        text = path_or_text
    else:
        from . import storage

        text = storage.read_bytes(path_or_text).decode()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path_or_text}: the config must be a YAML mapping")
    return data
