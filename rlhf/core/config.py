"""Configs of stages and commands: one YAML per stage, overridable on the command line, checked key by key.

A stage's config is a set of dataclasses (model, data, the stage's own fields, and for SFT/reward
TRL's ``SFTConfig``/``RewardConfig``, so argument names are TRL's and transformers'); every other
command (``rlhf export``, ``rlhf eval``, ``rlhf label serve``...) is one or two dataclasses too, read by
the same :func:`build_config`. So every command takes ``--key value`` and ``--config file.yaml``, and
prints ``--help`` in one format (:func:`format_help`: every key with its type, default and help text,
the help read from the docstring under the field or from transformers' ``metadata['help']``). From
Python, a stage takes the same keys as a dict (``run({"config": "configs/sft.yaml", "lr": 1e-4})``).

An unknown key is an error that names the key and the closest valid ones, a renamed key
(:data:`RENAMED_KEYS`) one that gives the new name and why, and a size, length or step count below
its range (:data:`RANGE_RULES`) one that names the key, before any work is done; each names where the
value came from (the YAML file, the command line, the config dict).

Why not transformers' ``HfArgumentParser`` (or TRL's ``TrlParser``, built on it) underneath: it turns
the dataclasses into an argparse parser, and what we keep on top would have to undo argparse:

- a key in two dataclasses (``trust_remote_code`` is in our ModelArguments and in TRL's DPOConfig and
  GRPOConfig) makes argparse raise "conflicting option strings" when the parser is built;
- argparse accepts any unambiguous prefix, so a typo such as ``--lora_dr 0.3`` silently sets
  ``lora_dropout``, where we want an error with did-you-mean hints; unknown keys from a dict or YAML
  (``parse_dict``) are one ValueError listing them, with no file and no hint;
- argparse errors exit with its usage text, not a one-line :class:`UserError` naming the file or key;
- the help comes from ``metadata['help']`` only, so our fields' docstrings (help written once, under
  the field, as cleanrl's Args) would have to be copied into metadata, the drift TRL's configs show;
- the merge order we need (stage defaults < YAML < a Python dict < command line) and the resolved
  config a run records are a few lines here and would stay ours anyway.

What HfArgumentParser would give beyond that, typed coercion of ``X | None``, lists and bools, is
:func:`_coerce`'s forty lines. So this module stays the one parser.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
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
    if isinstance(value, _Repeated) and tp in (bool, int, float, str):
        value = value[-1]  # a script that appends an override to a base command line: the last one wins
    if isinstance(value, list) and tp in (bool, int, float, str):
        raise UserError(f"{source}: key '{key}': expected one {tp.__name__}, found {len(value)} values: "
                        f"{' '.join(map(str, value))}")
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


class _Repeated(list):
    """The values of a key given more than once on the command line."""


def parse_overrides(argv: list[str], positional: tuple[str, ...] = ()) -> tuple[dict[str, Any], str | None]:
    """``['--config', 'a.yaml', '--lr', '1e-4', '--resume']`` -> ({'lr': '1e-4', 'resume': 'true'}, 'a.yaml').

    A key followed by several values (``--runs a b``), or given more than once (``--model a --model b``),
    gets the list of them (a key that takes one value then gets the last one, :func:`_coerce`); a key
    followed by none is a flag (``'true'``). ``positional`` names the keys
    that leading values fill, in order (``rlhf export runs/ppo`` = ``rlhf export --model runs/ppo``).
    """
    overrides: dict[str, Any] = {}
    config_path = None
    i = 0
    leading = []
    while i < len(argv) and not argv[i].startswith("--"):
        leading.append(argv[i])
        i += 1
    if len(leading) > len(positional):
        raise UserError(f"command line: expected --key value, found {leading[len(positional)]!r}"
                        + (f" (only {', '.join(k.upper() for k in positional)} may be given without its key)"
                           if positional else ""))
    overrides.update(zip(positional, leading))
    while i < len(argv):
        key, _, inline = argv[i][2:].partition("=")
        key = key.replace("-", "_")
        values = [inline] if inline else []
        i += 1
        while not inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        value: Any = values[0] if len(values) == 1 else values or "true"  # no value: a bare flag such as --resume
        if key == "config":
            if isinstance(value, list):
                raise UserError(f"command line: --config: expected one YAML file, found {len(value)}: {' '.join(value)}")
            config_path = value
        elif key in overrides:  # a list key collects every occurrence; for any other key the last one wins
            before = overrides[key] if isinstance(overrides[key], list) else [overrides[key]]
            overrides[key] = _Repeated(before + (value if isinstance(value, list) else [value]))
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
    "greedy": ("do_sample", "greedy decoding is --do_sample false, the sampling key every command shares "
                            "(SamplingArguments, transformers' name)"),
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


_REQUIRED = object()


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


def _wrap(text: str, indent: str = "      ") -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent=indent, subsequent_indent=indent)


def format_commands(prog: str, commands: dict[str, str], description: str = "") -> str:
    """The help of a command that only dispatches: its subcommands, one line each."""
    lines = [f"usage: {prog} COMMAND [--key value ...]"]
    if description:
        lines += ["", *textwrap.wrap(description, width=100)]
    lines += ["", *_command_lines(prog, commands)]
    return "\n".join(lines)


def _command_lines(prog: str, commands: dict[str, str]) -> list[str]:
    width = max(map(len, commands))
    lines = ["commands:"]
    for name, text in commands.items():
        lines += textwrap.wrap(text, width=100, initial_indent=f"  {name:<{width}}  ",
                               subsequent_indent=" " * (width + 4)) or [f"  {name}"]
    return lines + ["", f"'{prog} COMMAND --help' lists the keys of a command."]


def format_help(classes: list[type], extra_keys: tuple[str, ...] = (), defaults: dict[str, Any] | None = None, *,
                prog: str | None = None, description: str = "", positional: tuple[str, ...] = (),
                commands: dict[str, str] | None = None) -> str:
    """Every key of a stage or command, grouped by dataclass, with its type, default and help text.

    ``commands``: subcommands that share the command's name (``rlhf reward score``), listed at the end.
    """
    defaults = defaults or {}
    command = prog or _INVOKED_AS.get() or " ".join([Path(sys.argv[0]).name] + [a for a in sys.argv[1:2]
                                                                                if not a.startswith("-")])
    shortcut = "".join(f" [{key.upper()}]" for key in positional)
    lines = [f"usage: {command}{' [COMMAND]' if commands else ''}{shortcut} [--config FILE.yaml] [--key value ...]"]
    if description:
        lines += ["", *textwrap.wrap(description, width=100)]
    lines += ["", "Every key below can be set in the YAML file or on the command line (the command line wins);",
              "the default shown is what applies when neither sets it. A list takes several values (--key a b)."]
    if positional:
        lines.append(" ".join(f"{key.upper()} is short for --{key} {key.upper()}." for key in positional))
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
            type_name = getattr(tp, "__name__", None) if isinstance(tp, type) else None
            type_name = type_name or str(tp).replace("typing.", "")
            default = defaults.get(f.name, _default_of(f))
            shown = "required" if default is _REQUIRED else f"default: {default!r}"
            lines.append(f"  --{f.name} ({type_name}, {shown})")
            if helps.get(f.name):
                lines += _wrap(helps[f.name])
    if extra_keys:
        lines += ["", "run control:"]
        for key in extra_keys:
            lines.append(f"  --{key}")
            lines += _wrap(EXTRA_KEY_HELP.get(key, ""))
    if not seen and not extra_keys:
        lines += ["", "(no keys)"]
    if commands:
        lines += ["", *_command_lines(command, commands)]
    return "\n".join(lines)


def run_command(prog: str, commands: dict[str, tuple[Any, str]], argv: list[str], description: str = "") -> int:
    """Dispatch ``argv[0]`` to one of ``commands`` (name -> (function of the remaining argv, one-line help)).

    No command, ``-h``, ``--help`` or ``help`` prints :func:`format_commands`; an unknown one is an
    error with the closest names.
    """
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(format_commands(prog, {name: text for name, (_, text) in commands.items()}, description))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"{prog}: unknown command '{name}'{hint} (expected one of {', '.join(commands)})")
    with invoked_as(f"{prog} {name}"):
        return commands[name][0](rest) or 0


# The command being run (``rlhf label serve``), for the usage line of a help that was not given a prog.
_INVOKED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("invoked_as", default=None)


@contextlib.contextmanager
def invoked_as(command: str):
    """While inside, :func:`format_help` names ``command`` in its usage line unless told otherwise."""
    token = _INVOKED_AS.set(command)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


def build_config(
    classes: list[type],
    argv: list[str] | None = None,
    values: dict[str, Any] | None = None,
    extra_keys: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
    *,
    prog: str | None = None,
    description: str = "",
    positional: tuple[str, ...] = (),
    commands: dict[str, str] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Fill each dataclass in ``classes`` from a YAML file, ``values`` and ``--key value`` overrides.

    Precedence, lowest first: the dataclass defaults, ``defaults`` (the stage's own), the YAML file
    (``--config`` in ``argv``, else ``values['config']``), ``values`` (the dict a caller passes from
    Python), ``argv`` (the command line). Returns the instances and the flat dict of every key that
    was given (after coercion), which is what a run saves as its resolved config. A key may belong to
    several classes (e.g. ``seed``). ``extra_keys`` are accepted and returned but belong to no class
    (e.g. ``resume``). A field without a default is a required key. ``-h``/``--help`` prints every
    key (:func:`format_help`, with ``prog``, ``description``, the ``positional`` shortcuts and
    ``commands``) and exits with status 0.
    """
    if any(token in ("-h", "--help") for token in argv or []):
        print(format_help(classes, extra_keys, defaults, prog=prog, description=description, positional=positional,
                          commands=commands))
        raise SystemExit(0)
    overrides, config_path = parse_overrides(argv or [], positional)
    values = dict(values or {})
    config_path = config_path or values.pop("config", None)
    values.pop("config", None)
    given: dict[str, tuple[Any, str]] = {k: (v, "stage defaults") for k, v in (defaults or {}).items()}
    if config_path:
        for k, v in load_yaml(config_path).items():
            given[k] = (v, str(config_path))
    for k, v in values.items():
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

    for cls, kwargs in zip(classes, kwargs_per_class):
        for f in dataclasses.fields(cls):
            if f.init and f.name not in kwargs and _default_of(f) is _REQUIRED:
                what = field_help(cls).get(f.name, "")
                raise UserError(f"{prog or config_path or 'config'}: key '{f.name}': expected a value"
                                + (f" ({what.rstrip('.')})" if what else "") + f", found none; give --{f.name} VALUE")

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
