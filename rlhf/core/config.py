"""Stage configs: one YAML per stage, overridable on the command line, checked key by key.

A stage's config is a set of dataclasses (model, data, the stage's own fields, and for SFT/reward
TRL's ``SFTConfig``/``RewardConfig``, so argument names are TRL's and transformers'). The YAML is
flat; ``--key value`` on the command line overrides it. An unknown key is an error that names the key
and the closest valid ones, a renamed key (:data:`RENAMED_KEYS`) one that gives the new name and why,
and a size, length or step count below its range (:data:`RANGE_RULES`) one that names the key, before
any work is done. ``--help`` lists every key with its default and help text.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhf.core.errors import UserError, read_utf8


def _field_types(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference we cannot resolve: fall back to raw annotations
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Turn a YAML/command-line value into the field's type, or explain what was expected."""
    tp, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() == "null"):
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        origin = typing.get_origin(tp)
        if origin in (list, typing.List) or tp is list:
            if isinstance(value, str):
                parsed = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
                return list(parsed)
            return list(value)
        if isinstance(tp, type) and issubclass(tp, (str,)) and not isinstance(value, tp):
            return tp(value)  # str-valued enums
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise UserError(f"{source}: key '{key}': expected {name}, found {value!r}")
    return yaml.safe_load(value) if isinstance(value, str) and tp is Any else value


def parse_overrides(argv: list[str]) -> tuple[dict[str, str], str | None]:
    """``['--config', 'a.yaml', '--lr', '1e-4', '--resume']`` -> ({'lr': '1e-4', 'resume': 'true'}, 'a.yaml')."""
    overrides: dict[str, str] = {}
    config_path = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise UserError(f"command line: expected --key value, found {token!r}")
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if inline:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            value, i = "true", i + 1  # a bare flag such as --resume
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
    return overrides, config_path


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(read_utf8(path)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: expected valid YAML, found a syntax error ({getattr(e, 'problem', e)})")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of key: value, found a {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# Renamed keys and value ranges, checked for every class a config is built from
# ----------------------------------------------------------------------------------------------

# A key that was renamed: old name -> (new name, why). A config that still uses the old name is
# refused with the new one, rather than read silently, because the old name may mean something
# else in the libraries users come from.
RENAMED_KEYS: dict[str, tuple[str, str]] = {
    "target_kl": ("kl_target", ("in TRL and CleanRL target_kl is an early-stopping threshold on the policy's "
                                "approximate KL, while ours is the target of the adaptive KL controller")),
}

POSITIVE, NON_NEGATIVE = "positive", "non-negative"
# The range of a setting that counts or sizes something, by the end of its field name, so that one
# table covers our dataclasses, TRL's configs and transformers' TrainingArguments alike; the first
# matching rule wins. "positive" is >= 1 for an int and > 0 for a float (transformers reads
# logging/eval/save steps below 1 as fractions of the run, and epochs may be fractional).
RANGE_RULES: tuple[tuple[str, str], ...] = (
    ("warmup_steps", NON_NEGATIVE),  # 0 = no warm-up; below 1, a fraction of the steps
    ("batch_size", POSITIVE),
    ("validation_size", NON_NEGATIVE),  # 0 = hold out nothing; below 1, a fraction of the rows
    ("test_size", NON_NEGATIVE),
    ("_steps", POSITIVE),
    ("_epochs", POSITIVE),
    ("_length", POSITIVE),
    ("_tokens", POSITIVE),
    ("_samples", POSITIVE),
    ("_patience", POSITIVE),
    ("_horizon", POSITIVE),
    ("_num_proc", POSITIVE),
    ("lora_r", POSITIVE),
    ("lora_alpha", POSITIVE),
    ("seed", NON_NEGATIVE),  # numpy refuses negative seeds
    ("_workers", NON_NEGATIVE),  # 0 = load in the main process
    ("top_k", NON_NEGATIVE),  # 0 = off
    ("eval_prompts", NON_NEGATIVE),  # 0 = no final evaluation
    ("learning_rate", NON_NEGATIVE),
)
# Out-of-range values that mean something, keyed by (class name in the MRO, field), so this module
# needs no transformers import: transformers reads max_steps = -1 (its default) as "unset".
SENTINELS: dict[tuple[str, str], dict[Any, str]] = {
    ("TrainingArguments", "max_steps"): {-1: "train for num_train_epochs"},
}


def range_problem(cls: type, key: str, value: Any) -> str | None:
    """What ``value`` of ``cls.key`` should have been if it is out of range (``expected ...``), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    kind = next((k for ending, k in RANGE_RULES if key.endswith(ending)), None)
    sentinels = {v: meaning for klass in cls.__mro__ for v, meaning in SENTINELS.get((klass.__name__, key), {}).items()}
    if kind is None or value in sentinels or (value > 0 if kind == POSITIVE else value >= 0):
        return None
    tp, optional = _unwrap_optional(_field_types(cls).get(key, type(value)))
    expected = {(POSITIVE, True): "an integer >= 1", (POSITIVE, False): "a number > 0",
                (NON_NEGATIVE, True): "an integer >= 0", (NON_NEGATIVE, False): "a number >= 0"}[kind, tp is int]
    expected += "".join(f" or {v} ({meaning})" for v, meaning in sentinels.items())
    return expected + (" or null" if optional else "")


def check_ranges(obj: Any) -> None:
    """Check every field of a dataclass instance against :data:`RANGE_RULES` (for ``__post_init__``)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        expected = range_problem(type(obj), f.name, value)
        if expected:
            raise UserError(f"{f.name}: expected {expected}, found {_number(value)}")


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)  # 0.0 -> "0", as the user wrote it


# Keys a stage accepts beyond its dataclasses' fields.
EXTRA_KEY_HELP = {
    "resume": "Continue an interrupted run from the last checkpoint in <output_dir>.tmp.",
    "overwrite_output_dir": "Replace a finished run in output_dir (otherwise it is an error).",
}


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text: transformers/TRL keep it in ``metadata['help']``; our dataclasses
    keep it as the docstring under the field (written once, read here from the source)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                helps[statement.target.id] = " ".join(following.value.value.split())
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            helps[f.name] = " ".join(str(f.metadata["help"]).split())
    return helps


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def format_help(classes: list[type], extra_keys: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> str:
    """Every key of a stage, grouped by dataclass, with its type, default and help text."""
    defaults = defaults or {}
    command = " ".join([Path(sys.argv[0]).name] + [a for a in sys.argv[1:2] if not a.startswith("-")])
    lines = [f"usage: {command} [--config FILE.yaml] [--key value ...]", "",
             "Every key below can be set in the YAML file or on the command line (the command line wins);",
             "the default shown is what applies when neither sets it."]
    seen: set[str] = set()
    for cls in classes:
        helps, types_ = field_help(cls), _field_types(cls)
        fields = [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_") and f.name not in seen]
        if not fields:
            continue
        lines += ["", f"{cls.__name__}:"]
        for f in fields:
            seen.add(f.name)
            tp, _ = _unwrap_optional(types_.get(f.name, f.type))
            type_name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            default = defaults.get(f.name, _default_of(f))
            lines.append(f"  --{f.name} ({type_name}, default: {default!r})")
            if helps.get(f.name):
                lines += textwrap.wrap(helps[f.name], width=100, initial_indent="      ", subsequent_indent="      ")
    if extra_keys:
        lines += ["", "run control:"]
        for key in extra_keys:
            lines.append(f"  --{key}")
            lines += textwrap.wrap(EXTRA_KEY_HELP.get(key, ""), width=100, initial_indent="      ",
                                   subsequent_indent="      ")
    return "\n".join(lines)


def build_config(
    classes: list[type],
    argv: list[str] | None = None,
    values: dict[str, Any] | None = None,
    extra_keys: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Fill each dataclass in ``classes`` from a YAML (``--config``), ``values`` and ``--key value`` overrides.

    Returns the instances and the flat dict of every key that was given (after coercion), which is
    what a run saves as its resolved config. A key may belong to several classes (e.g. ``seed``).
    ``extra_keys`` are accepted and returned but belong to no class (e.g. ``resume``); ``defaults``
    are the stage's own defaults, below everything the user gives. ``-h``/``--help`` prints every
    key (:func:`format_help`) and exits with status 0.
    """
    if any(token in ("-h", "--help") for token in argv or []):
        print(format_help(classes, extra_keys, defaults))
        raise SystemExit(0)
    overrides, config_path = parse_overrides(argv or [])
    given: dict[str, tuple[Any, str]] = {k: (v, "stage defaults") for k, v in (defaults or {}).items()}
    if config_path:
        for k, v in load_yaml(config_path).items():
            given[k] = (v, str(config_path))
    for k, v in (values or {}).items():
        given[k] = (v, "config")
    for k, v in overrides.items():
        given[k] = (v, "command line")

    types_by_class = [_field_types(c) for c in classes]
    valid = set(extra_keys).union(*types_by_class)
    for key, (_, source) in given.items():
        if key not in valid:
            if key in RENAMED_KEYS and RENAMED_KEYS[key][0] in valid:
                new_name, why = RENAMED_KEYS[key]
                raise UserError(f"{source}: key '{key}' was renamed '{new_name}': {why}")
            close = difflib.get_close_matches(key, sorted(valid), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UserError(f"{source}: unknown key '{key}'{hint}")

    resolved: dict[str, Any] = {}
    kwargs_per_class: list[dict[str, Any]] = [{} for _ in classes]
    for key, (value, source) in given.items():
        owners = [i for i, t in enumerate(types_by_class) if key in t]
        if not owners:
            resolved[key] = _coerce(key, value, bool if key == "resume" else Any, source)
            continue
        for i in owners:
            kwargs_per_class[i][key] = _coerce(key, value, types_by_class[i][key], source)
            resolved[key] = kwargs_per_class[i][key]
            # Before any class is built: transformers and TRL take a negative batch size or a zero
            # max_length and fail only once training starts, with a traceback.
            expected = range_problem(classes[i], key, resolved[key])
            if expected:
                raise UserError(f"{source}: key '{key}': expected {expected}, found {_number(resolved[key])}")

    instances = []
    for cls, kwargs in zip(classes, kwargs_per_class):
        try:
            instances.append(cls(**kwargs))
        except UserError:
            raise
        except (ValueError, TypeError) as e:
            raise UserError(f"{config_path or 'config'}: {cls.__name__}: {e}".splitlines()[0])
    return instances, resolved


def to_plain(value: Any) -> Any:
    """A YAML-safe copy of a config value."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save_resolved_config(path: str | os.PathLike, own: list[Any], given: dict[str, Any]) -> None:
    """Write every field of our own dataclasses plus every key the user gave, as a loadable YAML."""
    data: dict[str, Any] = {}
    for obj in own:
        data.update(to_plain(obj))
    data.update(to_plain({k: v for k, v in given.items() if k != "resume"}))
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
