"""The demo task's automatic annotator: it stands in for the people who would label preferences.

The demo task is short replies to requests such as "Write a short review of ramen." or "Describe
Kyoto in one or two sentences.", where people prefer replies that are positive and on topic. No
people label the demo data; this module does, by a fixed, documented rule, so that the whole
pipeline (SFT -> reward model -> PPO) can be shown and measured on a laptop. An evaluation can use
the same rule as ground truth ("did the policy get better at what the labellers wanted?"), which
the learned reward model only approximates.

Score (deterministic)
---------------------
``annotator_score(prompt, reply) = sentiment + topic + penalty``, in [-3.5, 1.5]:

- ``sentiment``: the mean over the reply's sentences of VADER's compound polarity (vaderSentiment
  3.3.2), in [-1, 1]. Not the compound of the whole reply: VADER sums every word's valence before
  squashing it, so each further positive sentence would raise the score and the annotator would
  prefer longer replies at equal sentiment (measured on 511 SFT replies by
  experiments/annotator_length.py: two positive replies joined scored above both 96 % of the time;
  with the mean over sentences 8 %).
- ``topic``: ``+TOPIC_BONUS`` (0.5) if the reply shares a word with the prompt's subject, else
  ``-TOPIC_BONUS``; 0 if the prompt has no subject words. The subject words are the prompt's
  content words after dropping stop words and request words ("write", "short", "review",
  "describe", "sentences", ...): "Write a short review of the Grand Canyon." -> {grand, canyon}.
  Words are lowercased runs of letters and digits, with a crude plural fold
  ("tacos" -> "taco", "berries" -> "berry"), so "taco" in a reply matches "tacos" in the prompt.
- ``penalty``: ``-REPEAT_WEIGHT * (1 - distinct)`` (``REPEAT_WEIGHT`` = 2), where ``distinct`` is the
  share of distinct words among the reply's content words, so "great great great" loses 1.33 and
  a PPO policy can't win by repeating a positive word. A reply with no words at all gets
  ``-EMPTY_PENALTY`` (1.0), for a total of -1.5.

Labels (noisy)
--------------
People disagree, so labels come from a Bradley-Terry choice on the scores (the same model the
reward model is trained to fit, Ouyang et al. 2022, eq. 1)::

    P(a preferred over b) = sigmoid((score_a - score_b) / noise)

``noise`` is a temperature: at 0 the higher score always wins (a tie is a coin flip); as it grows
the choice tends to a coin flip. ``prefer`` draws exactly one ``rng.random()`` per call, so a
seeded ``random.Random`` makes the labels reproducible.

Imports only the standard library and vaderSentiment (no torch), so labeling needs no model.
"""

from __future__ import annotations

import functools
import math
import random
import re
from typing import NamedTuple

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

__all__ = [
    "TOPIC_BONUS",
    "REPEAT_WEIGHT",
    "EMPTY_PENALTY",
    "ScoreParts",
    "words",
    "content_words",
    "topic_words",
    "subject_of",
    "is_on_topic",
    "distinct_ratio",
    "score_parts",
    "annotator_score",
    "prob_prefer_a",
    "prefer",
]

TOPIC_BONUS = 0.5
"""Added for an on-topic reply, subtracted for an off-topic one: half of VADER's range, so a glowing
off-topic reply (compound ~0.9 -> 0.4) scores below a plain on-topic one (compound 0 -> 0.5)."""

REPEAT_WEIGHT = 2.0
"""Penalty per unit of repeated content words: large enough that repeating a positive word scores
below saying it once (VADER: ``"great"`` 0.62, ``"great great great"`` 0.92 - 1.33 = -0.41)."""

EMPTY_PENALTY = 1.0
"""Penalty for a reply with no words, so an empty reply (-1.5) scores below any worded one but the
most negative."""

# Function words, and the fragments that splitting contractions leaves ("won't" -> "won", "t").
STOP_WORDS = frozenset(
    """
    a an the this that these those it its it's they them their there here i me my we us our you your
    he she his her him is are was were be been being am do does did done have has had having will
    would shall should can could may might must won t s d ll re ve m not no nor so too very just
    really quite rather bit lot much more most some any all each every both few many such own same
    other than then also only even still yet again ever of in on at by for with about into onto from
    to up down out off over under as if or and but because while what which who whom whose how why
    when where something anything nothing thing things one
    """.split()
)

# The words of the demo's request templates and common variants: they say what to do, not what about.
REQUEST_WORDS = frozenset(
    """
    write short brief briefly quick quickly review reviews describe description opinion opinions
    think tell give share impression impressions sentence sentences word words line lines two few
    feel feelings thought thoughts please explain summary summarize take
    rate rating verdict worth friend asked cent cents
    """.split()
)

_WORD = re.compile(r"[a-z0-9]+")


class ScoreParts(NamedTuple):
    """The three terms of :func:`annotator_score`; their sum is the score."""

    sentiment: float
    """VADER compound of the reply, in [-1, 1]."""
    topic: float
    """+TOPIC_BONUS on topic, -TOPIC_BONUS off topic, 0 when the prompt has no subject words."""
    penalty: float
    """<= 0: -REPEAT_WEIGHT * (1 - distinct ratio), or -EMPTY_PENALTY for a reply with no words."""


@functools.cache
def _vader() -> SentimentIntensityAnalyzer:
    # Loading the lexicon takes a few ms; one analyzer serves every call (it keeps no state).
    return SentimentIntensityAnalyzer()


def _fold_plural(word: str) -> str:
    """Crude plural fold so prompt and reply forms match: berries -> berry, tacos -> taco, glass stays."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    """Lowercased runs of letters and digits: "Cast-iron pans!" -> ["cast", "iron", "pans"]."""
    return _WORD.findall(text.lower())


def content_words(text: str) -> list[str]:
    """The words of ``text`` that are not stop words, plural-folded, in order (repeats kept)."""
    return [_fold_plural(w) for w in words(text) if w not in STOP_WORDS]


def topic_words(prompt: str) -> frozenset[str]:
    """The prompt's subject words: its content words that are not request words."""
    return frozenset(w for w in content_words(prompt) if w not in REQUEST_WORDS)


def subject_of(prompt: str) -> str:
    """The subject as the annotator sees it, e.g. "Describe the Grand Canyon." -> "grand canyon"."""
    seen: dict[str, None] = {}  # ordered set: the subject's words in prompt order
    for w in content_words(prompt):
        if w not in REQUEST_WORDS:
            seen.setdefault(w)
    return " ".join(seen)


def is_on_topic(prompt: str, reply: str) -> bool:
    """True if the reply shares at least one subject word with the prompt."""
    return not topic_words(prompt).isdisjoint(content_words(reply))


def distinct_ratio(reply: str) -> float:
    """Distinct / total content words of the reply; 1.0 when it has none (nothing repeated)."""
    cw = content_words(reply)
    return len(set(cw)) / len(cw) if cw else 1.0


def sentences(text: str) -> list[str]:
    """The reply's sentences: split after ., ! or ? (runs of them) followed by a space; never empty."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+", text.strip())]
    return [p for p in parts if p] or [text]


def whole_reply_sentiment(reply: str) -> float:
    """VADER's compound polarity of the whole reply, in [-1, 1]. It sums every word's valence before
    squashing, so each further positive sentence raises it: it rewards length at equal sentiment."""
    return _vader().polarity_scores(reply)["compound"]


def sentence_mean_sentiment(reply: str) -> float:
    """The mean of VADER's compound over the reply's sentences, in [-1, 1]: two sentences as positive
    as one score as that one does, so a longer reply is not preferred for its length."""
    found = sentences(reply)
    return sum(_vader().polarity_scores(s)["compound"] for s in found) / len(found)


def score_parts(prompt: str, reply: str) -> ScoreParts:
    """The annotator's score of ``reply`` to ``prompt``, term by term (see the module docstring)."""
    subject = topic_words(prompt)
    if not subject:
        topic = 0.0
    else:
        topic = TOPIC_BONUS if is_on_topic(prompt, reply) else -TOPIC_BONUS
    if not words(reply):
        return ScoreParts(sentiment=0.0, topic=topic, penalty=-EMPTY_PENALTY)
    sentiment = sentence_mean_sentiment(reply)
    penalty = REPEAT_WEIGHT * (distinct_ratio(reply) - 1.0)  # = -w * (1 - distinct); no repeats -> +0.0
    return ScoreParts(sentiment=sentiment, topic=topic, penalty=penalty)


def annotator_score(prompt: str, reply: str) -> float:
    """VADER compound + on-topic term + repetition/empty penalty, in [-3.5, 1.5]. Deterministic."""
    return sum(score_parts(prompt, reply))


def prob_prefer_a(score_a: float, score_b: float, noise: float) -> float:
    """Bradley-Terry probability that a is preferred: sigmoid((score_a - score_b) / noise).

    ``noise`` = 0 gives 1, 0 or 0.5 (a tie); ``noise`` < 0 is an error.
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, found {noise}")
    diff = score_a - score_b
    if noise == 0:
        return 1.0 if diff > 0 else 0.0 if diff < 0 else 0.5
    x = diff / noise
    # Stable sigmoid: exp of a non-positive number never overflows.
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def prefer(prompt: str, reply_a: str, reply_b: str, rng: random.Random, noise: float) -> int:
    """A noisy human stand-in's choice between two replies: 0 if a is preferred, 1 if b.

    Draws one ``rng.random()`` and picks a with probability
    ``sigmoid((annotator_score(a) - annotator_score(b)) / noise)``.
    """
    p_a = prob_prefer_a(annotator_score(prompt, reply_a), annotator_score(prompt, reply_b), noise)
    return 0 if rng.random() < p_a else 1
