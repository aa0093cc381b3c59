"""Judges for ``rlhf eval``: anything that gives a (prompt, reply) a number, higher = better.

    --judges reward:runs/demo/reward,annotator,lexicon,my_judges:politeness,runs/other_reward

==========================  =====================================================================
spec                        judge
==========================  =====================================================================
``reward:<run dir>``        a trained reward model (a reward stage output), scored as it was
``<run dir>``               trained (:func:`rlhf.core.scoring.score_replies`); any number of them
``annotator``               the demo annotator (:func:`rlhf.demo.annotator.annotator_score`): the rule
                            that labelled the demo's preference pairs
``lexicon``                 an INDEPENDENT demo judge: lexicon sentiment + an on-topic check, written
                            separately from the annotator (another lexicon, another tokenizer, no
                            VADER), so alignment can be checked by a judge that did not label the
                            training pairs (see :func:`lexicon_score`). The lexicon is Pattern's
                            English adjectives (public domain, read from the textblob wheel)
``lexicon:afinn``           the same judge with the AFINN-en-165 lexicon (Nielsen 2011), from the
                            optional ``afinn`` package (``pip install 'rlhf-toolkit[afinn]'``), whose
                            PyPI release is labelled GPL (docs/licences.md)
``module:function``         a Python function ``function(prompt: str, reply: str) -> float``;
``path/to/file.py:function``  ``module`` is imported from the current directory or sys.path
==========================  =====================================================================

A chat-message prompt reaches text judges as its messages' contents joined by newlines; reward
models get the prompt as it is (their chat template).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from rlhf.core.errors import UserError
from rlhf.core.formatting import prompt_text

__all__ = [
    "Judge",
    "FunctionJudge",
    "RewardModelJudge",
    "parse_judges",
    "load_function",
    "LEXICONS",
    "lexicon_words",
    "lexicon_sentiment",
    "subject_terms",
    "on_topic",
    "lexicon_score",
]

JudgeFunction = Callable[[str, str], float]
"""The exact signature of a user judge: ``function(prompt: str, reply: str) -> float``, higher = better."""


# ----------------------------------------------------------------------------------------------
# The independent demo judge: lexicon sentiment + on-topic check
# ----------------------------------------------------------------------------------------------

LEXICON_OFF_TOPIC = 1.0
"""Subtracted from an off-topic reply's sentiment: the most glowing off-topic reply (just under 1)
scores below a neutral on-topic one (0)."""

_NEGATORS = frozenset("not no never none nothing neither nor hardly barely isn't wasn't aren't don't doesn't "
                      "didn't can't cannot couldn't won't wouldn't shouldn't".split())
# Function words, and the words of requests ("write a short review of", "what do you think of"):
# they say what to do, not what about. Kept separate from the annotator's lists on purpose.
_NON_SUBJECT = frozenset("""
a an the this that these those it its they them their there here i me my we us our you your yours he she
his her him is are was were be been being am do does did have has had will would shall should can could
may might must of in on at by for with about into onto from to up down out off over under as if or and
but because while what which who whom whose how why when where please some any all each every both few
many such own same other than then also only just very really quite so too much more most one two three
write writing review reviews describe description opinion opinions think thought thoughts tell give share
impression impressions sentence sentences word words line lines paragraph short brief briefly quick
quickly little summary summarize summarise explain feel feeling feelings say something anything rate
rating recommend comment comments view views take sum up couple few like know let mean
""".split())
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


@functools.cache
def _pattern_lexicon() -> dict[str, float]:
    """Pattern's subjectivity lexicon for English adjectives (De Smedt & Daelemans 2012, "Pattern for
    Python", JMLR 13; public domain under the PDDL), the en-sentiment.xml that the textblob wheel (MIT)
    ships: word -> polarity in -1..1, the mean over the word's senses (as Pattern averages them).

    Read as data: textblob itself (and the nltk it imports) is never imported.
    """
    spec = importlib.util.find_spec("textblob")
    path = Path(spec.submodule_search_locations[0]) / "en" / "en-sentiment.xml" if spec else None
    if path is None or not path.is_file():
        raise UserError("--judges lexicon: expected the textblob package (a dependency of rlhf-toolkit, which ships "
                        f"Pattern's en-sentiment.xml), found {'no ' + str(path) if path else 'none'}: pip install textblob")
    senses: dict[str, list[float]] = {}
    for word in ElementTree.parse(path).getroot().iter("word"):
        form = word.get("form", "").lower()
        if form and " " not in form:
            senses.setdefault(form, []).append(float(word.get("polarity", 0.0)))
    return {w: sum(p) / len(p) for w, p in senses.items() if sum(p) != 0.0}


@functools.cache
def _afinn() -> dict[str, float]:
    """AFINN-en-165 (Nielsen 2011; in the optional ``afinn`` wheel): word -> valence / 5, in -1..1."""
    try:
        from afinn import Afinn
    except ImportError:
        raise UserError("--judges lexicon:afinn: expected the afinn package, found none: pip install "
                        "'rlhf-toolkit[afinn]' (its PyPI release is labelled GPL, its word list ODbL: "
                        "docs/licences.md); the judge 'lexicon' needs nothing more") from None
    reader = Afinn()
    return {w: float(v) / 5.0 for w, v in reader.read_word_file(reader.full_filename("AFINN-en-165.txt")).items()
            if " " not in w}


LEXICONS: dict[str, Callable[[], dict[str, float]]] = {"pattern": _pattern_lexicon, "afinn": _afinn}
"""The sentiment lexicons of the lexicon judge, by name: word -> polarity in -1..1. ``pattern`` (the
default) is public domain and installed with the toolkit; ``afinn`` is an optional extra."""
DEFAULT_LEXICON = "pattern"


def lexicon_words(lexicon: str = DEFAULT_LEXICON) -> dict[str, float]:
    """The word -> polarity (-1..1) table of a lexicon in :data:`LEXICONS`."""
    if lexicon not in LEXICONS:
        raise UserError(f"--judges lexicon:{lexicon}: expected one of {', '.join(LEXICONS)}, found {lexicon!r}")
    return LEXICONS[lexicon]()


def _stem(word: str) -> str:
    """A crude English stem: possessive and plural endings off (berries -> berry, boxes -> box)."""
    if word.endswith("'s"):
        word = word[:-2]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def lexicon_sentiment(reply: str, lexicon: str = DEFAULT_LEXICON) -> float:
    """Polarity of the reply's DISTINCT sentiment words, negation flipped, squashed: ``tanh(sum)``.

    Polarities are in -1..1 (Pattern's as they are, AFINN's valence / 5). Distinct words, so "great
    great great" counts as one "great" (repeating a positive word earns nothing); a word right after
    a negator ("not", "never", "isn't", ...) counts with its sign flipped ("not bad" is mildly
    positive). tanh maps one strongest word (+-1) to +-0.76. In (-1, 1).
    """
    words = lexicon_words(lexicon)
    tokens = _WORD.findall(reply.lower())
    seen: dict[str, float] = {}
    for i, token in enumerate(tokens):
        value = words.get(token)
        if value is None or token in seen:
            continue
        negated = i > 0 and (tokens[i - 1] in _NEGATORS or tokens[i - 1].endswith("n't"))
        seen[token] = -value if negated else value
    return math.tanh(sum(seen.values()))


def subject_terms(prompt: str) -> frozenset[str]:
    """The prompt's subject: its stemmed words that are neither function words nor request words."""
    return frozenset(_stem(w) for w in _WORD.findall(prompt.lower()) if w not in _NON_SUBJECT and len(w) > 1)


def on_topic(prompt: str, reply: str) -> bool | None:
    """Whether the reply names the prompt's subject (shares a stemmed subject word); None if the prompt has none."""
    subject = subject_terms(prompt)
    if not subject:
        return None
    return not subject.isdisjoint(_stem(w) for w in _WORD.findall(reply.lower()))


def lexicon_score(prompt: str, reply: str, lexicon: str = DEFAULT_LEXICON) -> float:
    """The independent demo judge: ``lexicon_sentiment(reply) - (1 if off topic else 0)``, in (-2, 1).

    An off-topic reply (on_topic False) loses LEXICON_OFF_TOPIC; a prompt without subject words
    costs nothing. An empty reply has no sentiment and names no subject: -1.
    """
    return lexicon_sentiment(reply, lexicon) - (LEXICON_OFF_TOPIC if on_topic(prompt, reply) is False else 0.0)


# ----------------------------------------------------------------------------------------------
# Judges
# ----------------------------------------------------------------------------------------------


class Judge:
    """Scores (prompt, reply) rows; higher = better. ``score`` returns one float per row."""

    name: str
    kind: str
    """'reward', 'annotator', 'lexicon' or 'function'."""
    run_dir: str | None = None

    def score(self, prompts: list, replies: list[str], progress: bool = False) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        """Free whatever the judge loaded (a reward model)."""


class FunctionJudge(Judge):
    """A judge from a plain ``function(prompt: str, reply: str) -> float``."""

    def __init__(self, name: str, function: JudgeFunction, kind: str = "function"):
        self.name, self.function, self.kind = name, function, kind

    def score(self, prompts: list, replies: list[str], progress: bool = False) -> list[float]:
        scores = []
        rows = zip(prompts, replies)
        for i, (prompt, reply) in enumerate(tqdm(rows, total=len(replies), desc=f"judging ({self.name})",
                                                 disable=not progress or len(replies) < 200)):
            value = self.function(prompt_text(prompt), reply)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"judge {self.name}: expected function(prompt: str, reply: str) to return a finite "
                                f"number, found {value!r} for row {i} (prompt {prompt_text(prompt)[:60]!r})")
            scores.append(float(value))
        return scores


class RewardModelJudge(Judge):
    """A reward stage output: the reward model scores each row as in training; loaded on first use."""

    kind = "reward"

    def __init__(self, name: str, run_dir: str, batch_size: int = 16, device: str | None = None):
        from rlhf.core.runs import read_run

        info = read_run(run_dir)
        if info.task != "seq-cls":
            raise UserError(f"--judges: expected a reward stage output for the judge {name}, found {info.describe()} "
                            f"in {run_dir}")
        self.name, self.run_dir, self.batch_size, self.device = name, str(run_dir), batch_size, device
        self._loaded = None

    def score(self, prompts: list, replies: list[str], progress: bool = False) -> list[float]:
        from rlhf.core.runs import load_run
        from rlhf.core.scoring import score_replies

        if self._loaded is None:
            self._loaded = load_run(self.run_dir, "seq-cls", self.device)
        model, tokenizer = self._loaded
        return score_replies(model, tokenizer, prompts, replies, self.batch_size, progress=progress)

    def close(self) -> None:
        self._loaded = None


def load_function(spec: str) -> JudgeFunction:
    """``module:function`` or ``path/to/file.py:function`` -> the function, checked to take two arguments."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--judges: expected module:function, found {spec!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise UserError(f"--judges {spec}: expected a Python file {path}, found none")
        mod_spec = importlib.util.spec_from_file_location(f"rlhf_user_judge_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: say which one failed and how
            raise UserError(f"--judges {spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise UserError(f"--judges {spec}: expected an importable module {module_name!r} (from the current "
                            f"directory or sys.path), found none ({e})") from e
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(f"--judges {spec}: expected a function {attr!r} in {module_name}, found "
                        f"{'nothing' if function is None else type(function).__name__}")
    try:
        inspect.signature(function).bind("prompt", "reply")
    except TypeError:
        raise UserError(f"--judges {spec}: expected function(prompt: str, reply: str) -> float, found "
                        f"{attr}{inspect.signature(function)}") from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return function


def parse_judges(spec: str | list[str], batch_size: int = 16, device: str | None = None) -> list[Judge]:
    """Judges from a comma-separated spec (see the module docstring); names are unique."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise UserError("--judges: expected at least one judge, found none")
    from rlhf.demo.annotator import annotator_score

    reward_dirs = [s[len("reward:"):] if s.startswith("reward:") else s for s in items
                   if s.startswith("reward:") or (":" not in s and s not in ("annotator", "lexicon"))]
    judges: list[Judge] = []
    for item in items:
        if item == "annotator":
            judges.append(FunctionJudge("annotator", annotator_score, kind="annotator"))
        elif item == "lexicon":
            lexicon_words()  # a missing lexicon fails here, before any generation
            judges.append(FunctionJudge("lexicon", lexicon_score, kind="lexicon"))
        elif item.startswith("lexicon:"):
            name = item[len("lexicon:"):]
            lexicon_words(name)
            judges.append(FunctionJudge(item, functools.partial(lexicon_score, lexicon=name), kind="lexicon"))
        elif item.startswith("reward:") or ":" not in item:
            run_dir = item[len("reward:"):] if item.startswith("reward:") else item
            if not Path(run_dir).expanduser().is_dir():
                raise UserError(f"--judges: expected annotator, lexicon, lexicon:afinn, reward:<run dir>, a reward run "
                                f"directory or module:function, found {item!r} (no such directory)")
            name = "reward" if len(reward_dirs) == 1 else f"reward:{run_dir}"
            judges.append(RewardModelJudge(name, run_dir, batch_size, device))
        else:
            judges.append(FunctionJudge(item, load_function(item)))
    names = [j.name for j in judges]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"--judges: expected each judge once, found {', '.join(duplicates)} more than once")
    return judges
