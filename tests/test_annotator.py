"""The demo annotator (rlhf/demo/annotator.py): what it rewards, what it penalises, and its noisy labels."""

import math
import random

import pytest

from rlhf.demo.annotator import (
    EMPTY_PENALTY,
    REPEAT_WEIGHT,
    TOPIC_BONUS,
    annotator_score,
    is_on_topic,
    prefer,
    prob_prefer_a,
    score_parts,
    subject_of,
    topic_words,
)

PROMPT = "Write a short review of ramen."
POSITIVE = "Ramen is wonderful; the broth felt delightful."
NEUTRAL = "Ramen is ordinary, with a typical broth."
NEGATIVE = "Ramen is terrible, and the broth felt awful."


def test_prefers_positive_on_topic_replies():
    assert annotator_score(PROMPT, POSITIVE) > annotator_score(PROMPT, NEUTRAL) > annotator_score(PROMPT, NEGATIVE)


def test_request_words_are_not_the_subject():
    assert topic_words(PROMPT) == {"ramen"}
    assert subject_of("Describe the Grand Canyon in one or two sentences.") == "grand canyon"
    assert subject_of("Tell me briefly how you feel about fish tacos?") == "fish taco"
    # Echoing the request is not being on topic.
    assert not is_on_topic(PROMPT, "Here is a short review: lovely.")


def test_off_topic_loses_twice_the_bonus():
    # Same sentence, other subject: VADER sees the same words, only the topic term changes.
    on, off = score_parts(PROMPT, "Ramen is wonderful."), score_parts(PROMPT, "Sushi is wonderful.")
    assert on.sentiment == off.sentiment
    assert (on.topic, off.topic) == (TOPIC_BONUS, -TOPIC_BONUS)
    assert annotator_score(PROMPT, "Ramen is wonderful.") - annotator_score(PROMPT, "Sushi is wonderful.") == pytest.approx(
        2 * TOPIC_BONUS
    )
    # A glowing off-topic reply scores below a plain on-topic one.
    assert annotator_score(PROMPT, "Sushi is wonderful and delightful.") < annotator_score(PROMPT, NEUTRAL)


def test_plural_forms_match():
    assert is_on_topic("What do you think of fish tacos?", "This taco was great.")
    assert is_on_topic("Describe a blueberry.", "Fresh blueberries are lovely.")


def test_repetition_is_penalised():
    # content words: ramen, great x 4 -> 2 distinct of 5 -> penalty -2 * (1 - 2/5) = -1.2
    parts = score_parts(PROMPT, "Ramen is great great great great.")
    assert parts.penalty == pytest.approx(-REPEAT_WEIGHT * (1 - 2 / 5))
    assert annotator_score(PROMPT, "Ramen is great great great great.") < annotator_score(PROMPT, "Ramen is great.")
    assert score_parts(PROMPT, "Ramen is great.").penalty == 0


def test_empty_reply_scores_lowest_worded_level():
    for reply in ("", "   ", "..."):
        assert score_parts(PROMPT, reply) == (0.0, -TOPIC_BONUS, -EMPTY_PENALTY)
        assert annotator_score(PROMPT, reply) == pytest.approx(-1.5)


def test_prompt_without_subject_words_has_no_topic_term():
    assert score_parts("Write a short review.", "It is lovely.").topic == 0.0


def test_prob_prefer_a_is_bradley_terry():
    assert prob_prefer_a(1.0, 1.0, noise=0.5) == 0.5
    # sigmoid(ln 3) = 3 / (1 + 3) = 0.75, here (1.5 - 0.4) / noise = ln 3
    assert prob_prefer_a(1.5, 0.4, noise=1.1 / math.log(3)) == pytest.approx(0.75)
    assert prob_prefer_a(0.4, 1.5, noise=1.1 / math.log(3)) == pytest.approx(0.25)
    # noise 0: the higher score always wins, a tie is a coin flip; huge ratios don't overflow
    assert [prob_prefer_a(1, 0, 0), prob_prefer_a(0, 1, 0), prob_prefer_a(1, 1, 0)] == [1.0, 0.0, 0.5]
    assert prob_prefer_a(-2.0, 1.0, noise=1e-9) == 0.0
    with pytest.raises(ValueError):
        prob_prefer_a(1.0, 0.0, noise=-0.1)


def test_prefer_with_tiny_noise_follows_the_score():
    rng = random.Random(0)
    assert all(prefer(PROMPT, POSITIVE, NEUTRAL, rng, noise=1e-6) == 0 for _ in range(200))
    assert all(prefer(PROMPT, NEUTRAL, POSITIVE, rng, noise=1e-6) == 1 for _ in range(200))


def test_prefer_with_large_noise_is_a_coin_flip():
    rng = random.Random(0)
    share_a = sum(prefer(PROMPT, POSITIVE, NEGATIVE, rng, noise=1e6) == 0 for _ in range(2000)) / 2000
    assert abs(share_a - 0.5) < 0.05


def test_prefer_draws_at_the_bradley_terry_rate():
    gap = annotator_score(PROMPT, POSITIVE) - annotator_score(PROMPT, NEUTRAL)
    noise = gap / math.log(3)  # P(a) = sigmoid(ln 3) = 0.75
    rng = random.Random(1)
    share_a = sum(prefer(PROMPT, POSITIVE, NEUTRAL, rng, noise) == 0 for _ in range(4000)) / 4000
    assert abs(share_a - 0.75) < 0.03


def test_prefer_is_reproducible_and_draws_once():
    labels = [[prefer(PROMPT, POSITIVE, NEUTRAL, rng, 0.3) for _ in range(50)] for rng in (random.Random(7), random.Random(7))]
    assert labels[0] == labels[1]
    assert 0 < sum(labels[0]) < 50  # noise 0.3 on a gap of ~0.9 flips some labels
    # One call uses exactly one rng.random(), so a dataset's labels don't depend on scoring internals.
    rng, twin = random.Random(3), random.Random(3)
    prefer(PROMPT, POSITIVE, NEUTRAL, rng, noise=0.0)
    twin.random()
    assert rng.random() == twin.random()


def test_a_second_sentence_as_positive_as_the_first_does_not_raise_the_score():
    """Length-neutral: VADER's whole-reply compound grows with each positive sentence; the annotator's
    sentiment (the mean over sentences) does not."""
    from rlhf.demo.annotator import score_parts, sentence_mean_sentiment, sentences, whole_reply_sentiment

    one, two = "The tea is great.", "The tea is great. The tea is good."
    assert sentences(two) == ["The tea is great.", "The tea is good."]
    assert whole_reply_sentiment(two) > whole_reply_sentiment(one)  # what the annotator no longer uses
    assert sentence_mean_sentiment(two) <= sentence_mean_sentiment(one)
    assert score_parts("Write a short review of tea.", two).sentiment == sentence_mean_sentiment(two)
    assert sentence_mean_sentiment("The tea is great. The tea is great!") == pytest.approx(
        (sentence_mean_sentiment("The tea is great.") + sentence_mean_sentiment("The tea is great!")) / 2)
