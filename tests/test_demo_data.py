"""The demo data generator (rlhf/demo/make_data.py) and the files it committed in data/demo/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from script_modules import script_module

from rlhf.demo.annotator import annotator_score, content_words, is_on_topic, score_parts, subject_of

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "rlhf" / "demo" / "make_data.py"
COMMITTED = REPO / "data" / "demo"
SPLITS = ("train", "validation", "test")
FIELDS = {"sft": {"prompt", "completion"}, "prefs": {"prompt", "chosen", "rejected"}, "prompts": {"prompt"}}
SMALL = {
    "--sft-train": 24, "--sft-validation": 8, "--sft-test": 8,
    "--prefs-train": 24, "--prefs-validation": 8, "--prefs-test": 12,
    "--prompts-train": 10, "--prompts-test": 6,
}  # fmt: skip


def generate(cwd: Path, *args: str) -> Path:
    """Run the script with ``--out demo`` inside ``cwd`` (so README's command is the same everywhere)."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(SCRIPT), "--out", "demo", *args], cwd=cwd, env=env, check=True, capture_output=True)
    return cwd / "demo"


def small_args(seed: int = 0) -> list[str]:
    return ["--seed", str(seed)] + [str(x) for item in SMALL.items() for x in item]


def contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_files(directory: Path) -> dict[str, list[dict]]:
    """The split files (the held-out evaluation prompts are checked on their own)."""
    return {p.stem: read_jsonl(p) for p in sorted(directory.glob("*.jsonl")) if p.stem != "prompts_heldout"}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("small"), *small_args())


def test_same_seed_same_bytes(small, tmp_path):
    again = generate(tmp_path / "again", *small_args())
    assert contents(again) == contents(small)
    other = generate(tmp_path / "other", *small_args(seed=1))
    assert contents(other)["sft_train.jsonl"] != contents(small)["sft_train.jsonl"]


def test_committed_data_is_what_the_documented_command_makes(tmp_path):
    # The README's command, run again, must reproduce every committed byte (rerun it after changing
    # the generator or the annotator).
    fresh = generate(tmp_path, "--seed", "0")
    readme = (COMMITTED / "README.md").read_text(encoding="utf-8")
    assert "python -m rlhf.demo.make_data --out data/demo --seed 0" in readme
    committed = contents(COMMITTED)
    committed["README.md"] = committed["README.md"].replace(b"--out data/demo", b"--out demo")
    assert contents(fresh) == committed


@pytest.mark.parametrize("directory", ["small", "committed"])
def test_files_parse_with_required_fields(directory, small):
    root = small if directory == "small" else COMMITTED
    files = load_files(root)
    expected = [f"{kind}_{split}" for kind in ("sft", "prefs") for split in SPLITS] + ["prompts_train", "prompts_test"]
    assert sorted(files) == sorted(expected)
    for name, rows in files.items():
        assert rows, name
        for row in rows:
            assert set(row) == FIELDS[name.split("_")[0]], (name, row)
            assert all(isinstance(v, str) and v.strip() for v in row.values()), (name, row)
        if name.startswith("prefs"):
            assert all(row["chosen"] != row["rejected"] for row in rows)
        if name.startswith("prompts"):
            assert len({row["prompt"] for row in rows}) == len(rows), f"{name}: repeated prompts"
    if directory == "small":
        for flag, n in SMALL.items():
            assert len(files[flag[2:].replace("-", "_")]) == n


@pytest.mark.parametrize("directory", ["small", "committed"])
def test_splits_share_no_prompt_or_subject(directory, small):
    root = small if directory == "small" else COMMITTED
    files = load_files(root)
    prompts = {split: set() for split in SPLITS}
    texts = {split: [] for split in SPLITS}
    for name, rows in files.items():
        split = name.split("_")[1]
        for row in rows:
            prompts[split].add(row["prompt"])
            texts[split] += row.values()
    subjects = {split: {subject_of(p) for p in prompts[split]} for split in SPLITS}
    subject_words = {split: {w for s in subjects[split] for w in s.split()} for split in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a != b:
                assert not prompts[a] & prompts[b]
                assert not subjects[a] & subjects[b]
                # No text of one split (replies included) mentions another split's subject.
                words_b = {w for text in texts[b] for w in content_words(text)}
                assert not subject_words[a] & words_b, (a, b, subject_words[a] & words_b)


def test_script_check_rejects_overlapping_splits():
    with script_module(SCRIPT, "make_demo_data") as module:
        ok = {"sft_train": [{"prompt": "Describe ramen."}], "sft_test": [{"prompt": "Describe Kyoto."}]}
        module.check_disjoint(ok)
        with pytest.raises(SystemExit, match="share prompts"):
            module.check_disjoint({**ok, "prompts_test": [{"prompt": "Describe ramen."}]})
        with pytest.raises(SystemExit, match="subject words"):
            module.check_disjoint({**ok, "sft_test": [{"prompt": "Describe Kyoto.", "completion": "Ramen is nice."}]})


def test_sft_completions_are_a_mix_to_improve_on():
    rows = [row for split in SPLITS for row in read_jsonl(COMMITTED / f"sft_{split}.jsonl")]
    parts = [score_parts(row["prompt"], row["completion"]) for row in rows]
    positive = sum(p.sentiment > 0.05 for p in parts) / len(parts)
    negative = sum(p.sentiment < -0.05 for p in parts) / len(parts)
    off_topic = sum(not is_on_topic(row["prompt"], row["completion"]) for row in rows) / len(rows)
    assert 0.3 < positive < 0.6  # positive on or off topic: not mostly positive
    assert 0.15 < negative < 0.4
    assert 0.05 < off_topic < 0.15
    assert 0.3 < sum(map(sum, parts)) / len(parts) < 0.8  # best replies score ~1.4: room for PPO
    assert max(len(row["completion"].split()) for row in rows) <= 30


def test_preference_labels_disagree_with_the_annotator_sometimes():
    rows = [row for split in SPLITS for row in read_jsonl(COMMITTED / f"prefs_{split}.jsonl")]
    gaps = [annotator_score(r["prompt"], r["chosen"]) - annotator_score(r["prompt"], r["rejected"]) for r in rows]
    against = sum(g < 0 for g in gaps) / len(gaps)
    # 11.7 % with the length-neutral sentiment (the mean over sentences has smaller gaps than the
    # whole-reply compound): still well inside the disagreement seen between human labellers.
    assert 0.04 <= against <= 0.13
    assert sum(abs(g) < 0.5 for g in gaps) / len(gaps) > 0.15  # some pairs are subtle
    for r in rows:  # both replies answer the same prompt; at least one of them is on topic
        assert is_on_topic(r["prompt"], r["chosen"]) or is_on_topic(r["prompt"], r["rejected"])


@pytest.mark.parametrize("directory", ["small", "committed"])
def test_heldout_prompts_use_unseen_subjects_and_half_unseen_forms(directory, small):
    """prompts_heldout.jsonl: subjects no other file mentions, each asked in a trained request form
    and in a form no training prompt uses; the annotator reads each prompt's topic as its subject."""
    root = small if directory == "small" else COMMITTED
    heldout = read_jsonl(root / "prompts_heldout.jsonl")
    assert len(heldout) == 60 and all(set(row) == {"prompt", "subject", "form"} for row in heldout)
    assert sorted(row["form"] for row in heldout) == ["new"] * 30 + ["trained"] * 30
    other_words = {w for rows in load_files(root).values() for row in rows for v in row.values()
                   for w in content_words(v)}
    training_prompts = {row["prompt"] for rows in load_files(root).values() for row in rows}
    for row in heldout:
        assert subject_of(row["prompt"]) == subject_of(row["subject"]), row
        assert not set(subject_of(row["subject"]).split()) & other_words, row
        assert row["prompt"] not in training_prompts
    # A "new" form: its words around the subject never open or close a training prompt.
    for row in heldout:
        head, tail = row["prompt"].split(row["subject"])
        used = any(p.startswith(head) and p.endswith(tail) for p in training_prompts)
        assert used == (row["form"] == "trained"), row


def test_more_forms_adds_request_forms_and_replies_but_keeps_the_heldout_file(tmp_path):
    with script_module(SCRIPT, "make_demo_data_forms") as module:
        default_forms = [t.split("{s}")[0] for t in module.PROMPT_TEMPLATES]
        more_forms = [t.split("{s}")[0] for t in module.MORE_PROMPT_TEMPLATES]
    more = generate(tmp_path / "more", "--more-forms")
    rows = [row for split in SPLITS for kind in ("sft", "prefs") for row in read_jsonl(more / f"{kind}_{split}.jsonl")]
    rows += read_jsonl(more / "prompts_train.jsonl")
    assert any(row["prompt"].startswith(tuple(more_forms)) for row in rows)
    assert all(row["prompt"].startswith(tuple(default_forms + more_forms)) for row in rows)
    assert (more / "prompts_heldout.jsonl").read_bytes() == (COMMITTED / "prompts_heldout.jsonl").read_bytes()
    texts = {row["completion"] for split in SPLITS for row in read_jsonl(more / f"sft_{split}.jsonl")}
    assert texts != {row["completion"] for split in SPLITS for row in read_jsonl(COMMITTED / f"sft_{split}.jsonl")}
