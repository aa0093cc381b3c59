"""One command-line dialect: every ``rlhf`` command and subcommand prints ``--help`` in one format.

A command that dispatches lists its subcommands under ``commands:`` (``rlhf --help``, ``rlhf label
--help``); every other one prints ``usage: rlhf ... [--config FILE.yaml] [--key value ...]`` and one
line per key, ``--key (type, default: value)`` or ``--key (type, required)``, from rlhf/core/config.py.
The test walks the tree from ``rlhf --help`` down, so a new command is covered without being listed.
"""

from __future__ import annotations

import re

import pytest

from rlhf.app.cli import main

KEY_LINE = re.compile(r"^  --\w+ \((.+), (default: .*|required)\)$", re.M)
COMMAND_LINE = re.compile(r"^  ([\w-]+)  ", re.M)


def help_of(command: list[str], capsys) -> str:
    try:
        code = main([*command, "--help"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code in (0, None), f"rlhf {' '.join(command)} --help exited with {code}"
    assert "usage: " in out, out[:500]
    # transformers prints "[INFO] Running in WANDB offline mode" when first imported under WANDB_MODE=offline
    return out[out.index("usage: "):]


def subcommands(text: str) -> list[str]:
    if "\ncommands:\n" not in text:
        return []
    listed = text.split("\ncommands:\n", 1)[1].split("\n\n", 1)[0]
    return COMMAND_LINE.findall(listed)


def every_command(capsys) -> dict[tuple[str, ...], str]:
    """{command path: its help text}, walking from ``rlhf --help``."""
    found, todo = {}, [()]
    while todo:
        command = todo.pop(0)
        text = help_of(list(command), capsys)
        found[command] = text
        todo += [(*command, name) for name in subcommands(text)]
    return found


def test_every_command_and_subcommand_prints_its_keys_in_one_format(capsys):
    helps = every_command(capsys)
    paths = {" ".join(c) for c in helps}
    # The tree reaches the stages (from the registry), the subcommands of subcommands and the tools.
    assert {"sft", "reward", "reward score", "ppo", "dpo", "grpo", "rloo", "pipeline", "generate", "export", "chat",
            "estimate-memory", "model fetch", "model path", "eval", "eval forgetting", "eval canaries",
            "label import", "label generate", "label serve", "label annotate", "label stats",
            "label export"} <= paths
    for command, text in helps.items():
        name = " ".join(("rlhf",) + command)
        assert text.startswith(f"usage: {name} "), text[:200]
        if subcommands(text) and not KEY_LINE.search(text):
            continue  # a command that only dispatches (rlhf, rlhf label, rlhf model)
        assert "[--config FILE.yaml] [--key value ...]" in text.splitlines()[0], name
        assert KEY_LINE.search(text) or "(no keys)" in text, f"{name}: no key listed:\n{text[:500]}"


def test_help_shows_defaults_required_keys_and_positional_shortcuts(capsys):
    text = help_of(["export"], capsys)
    assert text.startswith("usage: rlhf export [MODEL] [--config FILE.yaml]")
    assert "MODEL is short for --model MODEL." in text
    assert "  --model (str, required)" in text and "  --dtype (str, default: None)" in text
    text = help_of(["chat"], capsys)
    assert "  --max_new_tokens (int, default: 256)" in text  # chat's own default over SamplingArguments'
    text = help_of(["eval"], capsys)
    assert "  --runs (list[str], required)" in text and "  --k (int, default: 4)" in text
    assert set(subcommands(text)) == {"forgetting", "factual", "bias", "canaries"}
    text = help_of(["ppo"], capsys)
    assert "  --kl_coef (float, default: 0.05)" in text and "\nrun control:\n  --resume" in text


@pytest.mark.parametrize("argv, expected", [
    (["export", "--modle", "x", "--out", "y"], "unknown key 'modle'; did you mean model?"),
    (["export", "--out", "y"], "key 'model': expected a value"),
    (["label", "servee", "c"], "unknown command 'servee'; did you mean serve?"),
    (["chat", "m", "--greedy"], "key 'greedy' was renamed 'do_sample'"),
    (["eval", "--runs", "a", "--out", "o", "--k", "1", "2"], "key 'k': expected one int, found 2 values"),
])
def test_command_line_mistakes_are_one_line_errors(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
