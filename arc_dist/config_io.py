"""``ArcConfig`` in the forms users already keep configuration in: dicts, YAML/TOML/JSON files,
environment variables and flat argument-parser dataclasses (``HfArgumentParser``, jsonargparse).

One naming rule for everything that cannot nest: a field's *flat name* is its path joined by
``__`` (``max_skips``, ``thresholds__loss_ratio_fail``); its environment variable is
``ARC_CONFIG_`` + the flat name in capitals (``ARC_CONFIG_MAX_SKIPS=3``,
``ARC_CONFIG_THRESHOLDS__LOSS_RATIO_FAIL=3``). The ``ARC_CONFIG_`` prefix keeps these apart from
the launcher's ``ARC_*`` flags (``ARC_LOG_DIR`` is the launcher's log directory, not
``ArcConfig.log_dir``).

Precedence, lowest first: the defaults, the dict or file, the environment (``env=True``), the
keywords given to ``Arc(...)``. Unknown keys raise ``ValueError`` naming the key and the closest
field; values of the wrong type raise ``TypeError`` naming the field. Torch is not imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "ARC_CONFIG_"
SEP = "__"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without ``None``, whether ``None`` is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _nested_classes(cls: type) -> dict[str, type]:
    """Fields of ``cls`` that are themselves config dataclasses (``thresholds``)."""
    return {n: t for n, t in _hints(cls).items() if dataclasses.is_dataclass(t)}


def _unknown(key: str, known: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return ValueError(f"{where}: unknown key {key!r}{hint}")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the field type ``tp`` (ints are accepted as floats)."""
    base, optional = _split_optional(tp)
    if value is None and optional:
        return None
    ok = (
        (base is bool and isinstance(value, bool))
        or (base is int and isinstance(value, int) and not isinstance(value, bool))
        or (base is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (base is str and isinstance(value, str))
    )
    if not ok:
        want = getattr(base, "__name__", str(base)) + (" or None" if optional else "")
        raise TypeError(f"ArcConfig.{name}={value!r} is a {type(value).__name__}; use a {want}")
    return float(value) if base is float else value


def _parse_text(name: str, text: str, tp: Any) -> Any:
    """An environment/command-line string as the field's type."""
    base, optional = _split_optional(tp)
    low = text.strip().lower()
    if optional and low in ("", "none", "null"):
        return None
    try:
        if base is bool:
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
    except ValueError:
        want = "true/false" if base is bool else base.__name__
        raise ValueError(f"ArcConfig.{name}: {text!r} is not a valid {want}") from None
    return text


def build(cls: type, data: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """``cls(**data)`` with nested dataclasses built from nested mappings, keys and types checked."""
    if not isinstance(data, Mapping):
        raise TypeError(
            f"{where}: expected a mapping of ArcConfig fields, got {type(data).__name__}"
        )
    hints, nested = _hints(cls), _nested_classes(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown(key, list(hints), where)
        if key in nested:
            if not isinstance(value, nested[key]):
                value = build(nested[key], value, f"{where}.{key}", f"{prefix}{key}.")
            kwargs[key] = value
        else:
            kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A nested plain dict (``from_dict`` reads it back; JSON/YAML/TOML can hold it)."""
    return dataclasses.asdict(obj)


def merge(base: dict, override: Mapping) -> dict:
    """``base`` with ``override``'s keys replaced, recursing into nested mappings."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


# -- flat names ---------------------------------------------------------------------------------
def flat_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """``{flat name: (type, default)}`` of every leaf field, in declaration order."""
    out: dict[str, tuple[Any, Any]] = {}
    hints, nested = _hints(cls), _nested_classes(cls)
    defaults = to_dict(cls())
    for f in dataclasses.fields(cls):
        if f.name in nested:
            for sub, (tp, default) in flat_fields(nested[f.name]).items():
                out[f"{f.name}{SEP}{sub}"] = (tp, default)
        else:
            out[f.name] = (hints[f.name], defaults[f.name])
    return out


def unflatten(cls: type, flat: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"thresholds__window": 50}`` -> ``{"thresholds": {"window": 50}}``; unknown names raise."""
    known = flat_fields(cls)
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in known:
            raise _unknown(key, list(known), where)
        *parents, leaf = key.split(SEP)
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def from_env(cls: type, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The nested overrides in ``ARC_CONFIG_*`` variables (strings parsed as the field types)."""
    environ = os.environ if environ is None else environ
    known = flat_fields(cls)
    flat = {}
    for var, text in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name not in known:
            names = [ENV_PREFIX + k.upper() for k in known]
            raise _unknown(var, names, "environment")
        flat[name] = _parse_text(name.replace(SEP, "."), text, known[name][0])
    return unflatten(cls, flat, "environment")


def read_file(path: str | os.PathLike, section: str | None) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON file's mapping (``section`` of it)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError(
            f"ArcConfig.from_file({path!r}): unknown file type {ext!r}; use .yaml, .yml, .toml "
            "or .json"
        )
    with open(path, "rb") as f:
        raw = f.read()
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise ImportError(
                    f"reading {path} needs tomllib (Python 3.11+) or: pip install tomli"
                ) from e
        data = tomllib.loads(raw.decode())
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyYAML: pip install pyyaml") from e
        data = yaml.safe_load(raw) or {}
    else:
        data = json.loads(raw)
    if section is not None:
        if not isinstance(data, dict) or section not in data:
            raise ValueError(f"ArcConfig.from_file({path!r}): no section {section!r} in the file")
        data = data[section]
    return data


def flat_dataclass(cls: type) -> type:
    """A dataclass with one field per flat name (same defaults), for argument parsers; its
    ``to_config()`` builds ``cls``. Optional fields are typed ``typing.Optional`` so that
    ``HfArgumentParser`` understands them."""
    fields = []
    for name, (tp, default) in flat_fields(cls).items():
        base, optional = _split_optional(tp)
        ftype = typing.Optional[base] if optional else base  # noqa: UP045 (parsers need it)
        meta = {"help": f"{cls.__name__}.{name.replace(SEP, '.')}"}
        fields.append((name, ftype, dataclasses.field(default=default, metadata=meta)))

    def to_config(self):
        return build(cls, unflatten(cls, dataclasses.asdict(self), "flat"), "flat")

    return dataclasses.make_dataclass(
        f"{cls.__name__}Flat",
        fields,
        namespace={"to_config": to_config, "__module__": cls.__module__},
        kw_only=True,
    )
