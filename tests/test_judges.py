"""rlhf eval's judges: the independent lexicon judge, module:function judges and the --judges spec."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf.core.errors import UserError
from rlhf.eval.judges import (FunctionJudge, lexicon_score, lexicon_sentiment, load_function, on_topic, parse_judges,
                         subject_terms)


def test_lexicon_judge_scores_sentiment_and_topic_independently_of_the_annotator():
    assert subject_terms("Tell me briefly how you feel about history podcasts.") == {"history", "podcast"}
    assert subject_terms("Write a short review of berries.") == {"berry"}
    assert on_topic("Write a short review of ramen.", "The ramen was rich.") is True
    assert on_topic("Describe the Grand Canyon.", "I love pizza.") is False
    assert on_topic("Write a short review.", "Anything.") is None  # no subject words
    # Pattern's polarities, squashed: "great" = mean of its senses (1.0, 1.0, 0.4) = 0.8 -> tanh(0.8);
    # repeating it earns nothing more.
    assert lexicon_sentiment("great") == pytest.approx(0.6640, abs=1e-4)
    assert lexicon_sentiment("great great great") == lexicon_sentiment("great")
    assert lexicon_sentiment("not bad") > 0 > lexicon_sentiment("bad")  # negation flips
    assert lexicon_sentiment("") == 0.0
    # On topic: sentiment alone; off topic: minus 1, so glowing off-topic < neutral on-topic.
    assert lexicon_score("Write a short review of ramen.", "Ramen is great.") == pytest.approx(0.6640, abs=1e-4)
    assert lexicon_score("Write a short review of ramen.", "Pizza is wonderful and amazing.") < \
        lexicon_score("Write a short review of ramen.", "Ramen exists.") == 0.0
    assert lexicon_score("Write a short review of ramen.", "") == -1.0
    # Not the annotator: a different lexicon (VADER scores "meh" but Pattern has no entry for it).
    from rlhf.demo.annotator import score_parts

    assert lexicon_sentiment("meh") == 0.0 and score_parts("x", "meh").sentiment != 0.0


def test_the_default_lexicon_is_read_as_data_without_importing_textblob_nltk_or_afinn():
    # Pattern's lexicon is public domain (PDDL); afinn's PyPI release says GPL: the default judge
    # must not need it, and reading the XML must not pull in textblob's code or nltk.
    code = ("import sys; from rlhf.eval.judges import lexicon_score, parse_judges; parse_judges('lexicon'); "
            "lexicon_score('Write a review of tea.', 'Tea is great.'); "
            "print(sorted({'afinn', 'textblob', 'nltk'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_afinn_lexicon_is_an_optional_extra(monkeypatch):
    from rlhf.eval import judges as judges_module

    # Without the afinn package: a clear error naming the extra, when the judges are parsed.
    judges_module._afinn.cache_clear()
    monkeypatch.setitem(sys.modules, "afinn", None)  # import afinn -> ImportError
    with pytest.raises(UserError, match=r"expected the afinn package, found none: pip install 'rlhf-toolkit\[afinn\]'"):
        parse_judges("annotator,lexicon:afinn")
    with pytest.raises(UserError, match="expected one of pattern, afinn, found 'vader'"):
        parse_judges("lexicon:vader")
    monkeypatch.delitem(sys.modules, "afinn")
    judges_module._afinn.cache_clear()
    pytest.importorskip("afinn")
    # With it: AFINN valences / 5, squashed: "great" = 3 -> tanh(0.6).
    judge = parse_judges("lexicon:afinn")[0]
    assert (judge.name, judge.kind) == ("lexicon:afinn", "lexicon")
    assert judge.score(["Write a short review of ramen."], ["Ramen is great."]) == [pytest.approx(0.5370, abs=1e-4)]
    assert lexicon_sentiment("meh", lexicon="afinn") == 0.0


def test_module_function_judge_loads_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "judge_mod_for_test.py").write_text(
        "def longer(prompt: str, reply: str) -> float:\n    return float(len(reply))\n"
        "def one_arg(reply):\n    return 1.0\n"
        "def bad(prompt, reply):\n    return 'high'\n"
        "NOT_A_FUNCTION = 3\n")
    by_path = load_function(f"{tmp_path / 'judge_mod_for_test.py'}:longer")
    assert by_path("p", "abc") == 3.0
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    judges = parse_judges("judge_mod_for_test:longer,annotator,lexicon")
    assert [j.name for j in judges] == ["judge_mod_for_test:longer", "annotator", "lexicon"]
    assert [j.kind for j in judges] == ["function", "annotator", "lexicon"]
    # Chat-message prompts reach text judges as their contents.
    seen = []
    FunctionJudge("spy", lambda p, r: seen.append(p) or 0.0).score([[{"role": "user", "content": "hi"}]], ["x"])
    assert seen == ["hi"]
    assert judges[0].score(["p", "p"], ["a", "abcd"]) == [1.0, 4.0]
    with pytest.raises(UserError, match=r"expected function\(prompt: str, reply: str\) -> float, found one_arg\(reply\)"):
        load_function("judge_mod_for_test:one_arg")
    with pytest.raises(UserError, match="expected a function 'NOT_A_FUNCTION' in judge_mod_for_test, found int"):
        load_function("judge_mod_for_test:NOT_A_FUNCTION")
    with pytest.raises(UserError, match="expected a function 'missing'"):
        load_function("judge_mod_for_test:missing")
    with pytest.raises(UserError, match=r"to return a finite number, found 'high' for row 0"):
        parse_judges("judge_mod_for_test:bad")[0].score(["p"], ["r"])
    sys.modules.pop("judge_mod_for_test", None)


def test_judge_spec_errors(tmp_path):
    with pytest.raises(UserError, match="found 'nosuchdir' \\(no such directory\\)"):
        parse_judges("annotator,nosuchdir")
    with pytest.raises(UserError, match="expected each judge once, found annotator more than once"):
        parse_judges("annotator,lexicon,annotator")
    with pytest.raises(UserError, match="expected at least one judge"):
        parse_judges(" , ")
    with pytest.raises(UserError, match="expected a Python file"):
        parse_judges(f"{tmp_path / 'none.py'}:f")


def test_reward_judge_refuses_a_causal_lm(tiny_model_dir):
    with pytest.raises(UserError, match="expected a reward stage output for the judge reward"):
        parse_judges(f"reward:{tiny_model_dir}")
