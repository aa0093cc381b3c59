"""Generate the demo task's data: prompts, SFT replies and annotator-labelled preference pairs.

    python -m rlhf.demo.make_data --out data/demo --seed 0      # what `make data` runs

The task: short replies to requests ("Write a short review of ramen.", "Describe Kyoto in one or
two sentences."), where people prefer replies that are positive and on topic. The labels come from
the automatic annotator in rlhf/demo/annotator.py (VADER sentiment + on-topic term + repetition penalty,
Bradley-Terry noise), which stands in for people; see its docstring for the exact rule.

Every file is a function of ``--seed`` and the size flags (each output draws from its own
``random.Random(f"{seed}:{name}")``, so changing one size leaves the other files unchanged). The
subjects are split per category into train / validation / test (70 / 15 / 15 %), so no subject,
prompt or subject word of one split appears in another; the script checks this before writing.

Writes to ``--out``: sft_{train,validation,test}.jsonl ({"prompt", "completion"}),
prefs_{train,validation,test}.jsonl ({"prompt", "chosen", "rejected"}),
prompts_{train,test}.jsonl ({"prompt"}), prompts_heldout.jsonl ({"prompt", "subject", "form"}:
held-out subjects in trained and new request forms, for evaluation only) and README.md (the command, the rule, sizes, label
disagreement with the noiseless annotator, mean annotator score of the SFT completions).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
from dataclasses import dataclass
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf.demo.annotator import (
    annotator_score,
    content_words,
    is_on_topic,
    prefer,
    prob_prefer_a,
    score_parts,
    topic_words,
)

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"validation": 0.15, "test": 0.15}  # per category; train gets the rest
MAX_REPLY_WORDS = 30
MIN_PAIR_GAP = 0.05
"""Pairs whose noiseless scores are closer than this are redrawn, so "disagrees with the noiseless
annotator" is always defined (there is no tie to break)."""

# ----------------------------------------------------------------------------------------------
# Subjects: (singular, plural) noun phrases per category, with what a reply can talk about.
# No two subjects share a content word, and no subject word carries VADER sentiment ("grand",
# "sweet", "fun" ... were left out), both checked in `check_vocabulary`.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Category:
    aspects: tuple[str, ...]
    """What a reply praises or criticises, read after "the": "the {aspect} felt wonderful"."""
    again: tuple[str, ...]
    """What a pleased reviewer would do next, with {it} for "it"/"them"."""
    singular: tuple[str, ...]
    plural: tuple[str, ...]


CATEGORIES = {
    "food": Category(
        aspects=("flavor", "texture", "seasoning", "portion size", "aroma", "presentation"),
        again=("have {it} again", "order {it} again", "recommend {it} to anyone"),
        singular=(
            "ramen", "sourdough bread", "margherita pizza", "pad thai", "mushroom risotto",
            "lentil soup", "sushi", "beef stew", "bibimbap", "Greek salad", "apple pie",
            "carrot cake", "guacamole", "mac and cheese", "tiramisu", "chicken curry", "paella",
            "pho", "shakshuka", "lasagna", "clam chowder",
        ),
        plural=(
            "fish tacos", "chocolate croissants", "falafel wraps", "blueberry pancakes",
            "gyoza", "veggie burgers", "cinnamon rolls", "potato wedges",
        ),
    ),
    "drink": Category(
        aspects=("taste", "sugar level", "aroma", "aftertaste", "temperature"),
        again=("order {it} again", "recommend {it} to anyone", "make {it} at home"),
        singular=(
            "green tea", "cold brew coffee", "hot cocoa", "lemonade", "kombucha", "seltzer",
            "chai", "iced matcha", "ginger beer", "orange juice",
        ),
        plural=("mango smoothies", "oat milk lattes"),
    ),
    "place": Category(
        aspects=("views", "atmosphere", "architecture", "local cuisine", "public transport"),
        again=("go back", "visit again", "recommend {it} to anyone"),
        singular=(
            "Kyoto", "Lisbon", "Yosemite", "Central Park", "the Louvre", "Venice", "Iceland",
            "Yellowstone", "Barcelona", "Machu Picchu", "Santorini", "Prague", "the Sahara",
            "Vancouver", "Marrakech", "New Orleans", "Cape Town", "Banff", "Istanbul",
            "the Amalfi Coast",
        ),
        plural=("the Scottish Highlands", "the Swiss Alps"),
    ),
    "gadget": Category(
        aspects=("build quality", "design", "price", "setup", "controls", "size"),
        again=("buy {it} again", "recommend {it} to anyone", "keep using {it}"),
        singular=(
            "a robot vacuum", "the Kindle Paperwhite", "an electric kettle", "a standing desk",
            "a portable projector", "an air fryer", "a sleep tracker", "a power bank",
            "an instant camera", "a gaming mouse", "a smartwatch", "a VR headset",
            "a label printer", "a sonic toothbrush", "a dashcam",
        ),
        plural=("over-ear headphones", "wireless earbuds", "mechanical keyboards", "Bluetooth speakers"),
    ),
    "story": Category(
        aspects=("pacing", "characters", "writing", "endings", "storytelling"),
        again=("recommend {it} to anyone", "come back to {it}", "spend more evenings on {it}"),
        singular=("reality TV",),
        plural=(
            "science fiction novels", "cozy mysteries", "comic books", "history podcasts",
            "nature documentaries", "sitcoms", "fantasy sagas", "spy dramas", "animated films",
            "audiobooks", "travel memoirs", "superhero movies", "detective shows", "anime series",
            "poetry collections",
        ),
    ),
    "music": Category(
        aspects=("melodies", "rhythm", "production", "mood", "arrangements"),
        again=("listen to {it} again", "recommend {it} to anyone", "put {it} on a playlist"),
        singular=(
            "jazz", "classical piano", "K-pop", "opera", "folk", "heavy metal", "reggae",
            "bluegrass", "techno",
        ),
        plural=("gospel choirs", "Broadway musicals"),
    ),
    "activity": Category(
        aspects=("learning curve", "cost", "equipment", "instruction", "atmosphere"),
        again=("try {it} again", "recommend {it} to anyone", "keep doing {it}"),
        singular=(
            "rock climbing", "yoga", "trail running", "birdwatching", "gardening", "kayaking",
            "salsa dancing", "cycling", "baking", "knitting", "meditation", "camping", "surfing",
            "skiing", "karaoke", "journaling", "archery", "snorkeling", "ice skating",
        ),
        plural=("pottery classes", "marathons"),
    ),
    "game": Category(
        aspects=("rules", "learning curve", "pacing", "strategy", "game length"),
        again=("play {it} again", "recommend {it} to anyone", "bring {it} to game night"),
        singular=(
            "chess", "Monopoly", "Catan", "Scrabble", "Tetris", "Minecraft", "sudoku", "poker",
            "Mario Kart", "Dungeons and Dragons", "mahjong",
        ),
        plural=("jigsaw puzzles", "crosswords"),
    ),
}

PROMPT_TEMPLATES = (
    "Write a short review of {s}.",
    "Describe {s} in one or two sentences.",
    "What do you think of {s}?",
    "Give a short opinion on {s}.",
    "Tell me briefly how you feel about {s}.",
    "Share a quick impression of {s}.",
)


# --more-forms (the "data diversity" lever, measured in docs/ppo_levers.md, not the default): six
# more request forms and more reply templates and adjectives, appended to the lists above so the
# held-out file is unchanged (it draws trained forms from HELDOUT_TRAINED_FORMS).
MORE_PROMPT_TEMPLATES = (
    "What are your thoughts on {s}?",
    "Give me a brief review of {s}.",
    "Tell me what you think about {s}.",
    "Write one sentence about {s}.",
    "Please describe {s} briefly.",
    "Share your opinion of {s} in a few words.",
)
HELDOUT_TRAINED_FORMS = PROMPT_TEMPLATES
"""The trained forms a held-out prompt draws from: the six default ones, with or without --more-forms."""

# The held-out evaluation set: subjects that no other file uses, and request forms that no training
# prompt uses, so that an alignment gain is measured on what PPO never saw (issue: gains that
# generalize). Each held-out subject is asked once in a trained form and once in a new one.
HELDOUT_SUBJECTS = (
    ("food", False, ("bouillabaisse", "pierogi", "ceviche", "goulash")),
    ("drink", False, ("horchata", "yerba mate", "espresso tonic")),
    ("place", False, ("Hokkaido", "Patagonia", "Dubrovnik", "Luang Prabang")),
    ("gadget", False, ("an e-reader", "a drone", "a waffle iron", "a rice cooker")),
    ("story", True, ("zines", "limericks", "fables")),
    ("music", False, ("flamenco", "bossa nova", "sea shanties")),
    ("activity", False, ("bouldering", "geocaching", "woodcarving", "paddleboarding")),
    ("game", False, ("backgammon", "Wingspan", "Pandemic", "dominoes", "bridge")),
)
HELDOUT_TEMPLATES = (
    "How would you rate {s}?",
    "What's your verdict on {s}?",
    "In a sentence or two, what's your take on {s}?",
    "Is {s} worth it? Tell me briefly.",
    "A friend asked me about {s}. What should I tell them?",
    "Give me your two cents on {s}.",
)

# ----------------------------------------------------------------------------------------------
# Replies: templates per sentiment bucket. Slots: {S}/{s} subject (capitalised / not), {be}
# is/are, {aspect}, {a1}/{a2} two different adjectives of the bucket, {again} the category's next
# step. Past-tense verbs after {aspect} ("felt", "seemed") need no agreement with it.
# ----------------------------------------------------------------------------------------------

ADJECTIVES = {
    "strong_positive": (
        "wonderful", "fantastic", "excellent", "delightful", "superb", "outstanding",
        "brilliant", "amazing", "lovely", "impressive", "terrific",
    ),
    "mild_positive": ("nice", "pleasant", "enjoyable", "good", "decent", "solid"),
    "neutral": ("ordinary", "typical", "average", "predictable"),
    "mild_negative": ("dull", "boring", "weak", "lame", "bland", "tedious"),
    "strong_negative": (
        "terrible", "awful", "dreadful", "disappointing", "miserable", "horrible", "unpleasant",
    ),
}

REPLY_TEMPLATES = {
    "strong_positive": (
        "{S} {be} {a1}. The {aspect} felt {a2}, and I would gladly {again}.",
        "Honestly, {s} {be} {a1}; I loved the {aspect} and would happily {again}.",
        "I was really impressed by {s}, especially the {a1} {aspect}. Truly {a2} overall.",
        "What a treat: {s} {be} {a1}, with {a2} {aspect} that made it worth it.",
        "{S}? Absolutely {a1}. The {aspect} seemed {a2}, and I would {again} any day.",
    ),
    "mild_positive": (
        "{S} {be} pretty {a1}, though the {aspect} felt a little uneven.",
        "I found {s} {a1} enough, even if the {aspect} did not stand out.",
        "{S} {be} {a1} overall; the {aspect} seemed fine, if not memorable.",
        "Fairly {a1}. {S} won't change your life, but the {aspect} works.",
        "I liked {s} well enough, and the {aspect} felt {a1} if a bit ordinary.",
    ),
    "neutral": (
        "{S} {be} about what you would expect; the {aspect} seemed fairly {a1}.",
        "{S} {be} {a1} in most ways, with a fairly {a2} {aspect}.",
        "It depends on taste. {S} {be} {a1}, and the {aspect} felt neither here nor there.",
        "There is not much to say about {s}. The {aspect} seemed {a1}, as expected.",
        "{S} {be} {a1}; the {aspect} and the rest felt middle of the road.",
    ),
    "mild_negative": (
        "{S} {be} a bit {a1}; the {aspect} felt {a2} and I probably would not {again}.",
        "I expected more from {s} and was a little disappointed; the {aspect} seemed rather {a1}.",
        "{S} {be} not that great, and the {aspect} felt somewhat {a1}.",
        "Somewhat {a1} overall: {s} {be} passable in places, but the {aspect} let it down.",
    ),
    "strong_negative": (
        "{S} {be} {a1}. The {aspect} felt {a2}, and I would never {again}.",
        "I really disliked {s}; the {aspect} seemed {a1} from start to finish.",
        "Avoid {s} if you can: the {aspect} felt {a1} and the whole experience was {a2}.",
        "{S}? Frankly {a1}, with {a2} {aspect} and no reason to {again}.",
    ),
    # About another subject than the prompt's: the reply must not mention the prompt's subject.
    "off_topic": (
        "That reminds me of {s}, which {be} {a1}; the {aspect} felt {a2}.",
        "I'd rather talk about {s}. {S} {be} {a1}, especially the {aspect}.",
        "Speaking of something else, {s} {be} {a1} and the {aspect} seemed {a2}.",
        "Not sure, but {s} {be} {a1} in my experience.",
    ),
}

MORE_ADJECTIVES = {
    "strong_positive": ("marvelous", "fabulous", "charming", "stunning", "gorgeous"),
    "mild_positive": ("likeable", "satisfying", "pleasing", "fine"),
    "neutral": ("standard", "conventional", "plain", "unremarkable"),
    "mild_negative": ("mediocre", "forgettable", "flat"),
    "strong_negative": ("horrendous", "dismal", "appalling", "painful"),
}
MORE_REPLY_TEMPLATES = {  # {A1}: {a1} capitalised
    "strong_positive": (
        "Loved it! {S} {be} {a1}, and the {aspect} was {a2}.",
        "I would {again}: {s} {be} {a1} and the {aspect} felt {a2}.",
        "{S} {be} simply {a1}, from the {aspect} to everything else.",
        "{A1}! The {aspect} of {s} made my day.",
    ),
    "mild_positive": (
        "Not bad at all: {s} {be} {a1}, and the {aspect} held up.",
        "{S} turned out {a1}; the {aspect} did its job.",
        "On the whole {a1}. {S} has a decent {aspect}, nothing more.",
    ),
    "neutral": (
        "{S} {be} {a1} overall, and the {aspect} was roughly what I expected.",
        "{S}: {a1}. I noticed the {aspect}, but it felt {a2}.",
        "Hard to say much. The {aspect} of {s} seemed {a1}.",
    ),
    "mild_negative": (
        "Meh. {S} {be} {a1}, and the {aspect} was {a2}.",
        "I was not won over by {s}; the {aspect} felt {a1}.",
        "{S} {be} {a1} in the end, and the {aspect} did not make up for it.",
    ),
    "strong_negative": (
        "Stay away from {s}. The {aspect} was {a1} and the rest {a2}.",
        "Worst in a while: {s} {be} {a1}, and the {aspect} was {a2}.",
        "{A1}. I regret trying {s}; the {aspect} felt {a2}.",
    ),
    "off_topic": (
        "Can we talk about {s} instead? {S} {be} {a1}.",
        "I keep thinking about {s}; the {aspect} felt {a1}.",
    ),
}


def use_more_forms() -> None:
    """--more-forms: append the MORE_* request forms, adjectives and reply templates to the defaults."""
    global PROMPT_TEMPLATES, ADJECTIVES, REPLY_TEMPLATES
    PROMPT_TEMPLATES = PROMPT_TEMPLATES + MORE_PROMPT_TEMPLATES
    ADJECTIVES = {bucket: words + MORE_ADJECTIVES.get(bucket, ()) for bucket, words in ADJECTIVES.items()}
    REPLY_TEMPLATES = {bucket: t + MORE_REPLY_TEMPLATES.get(bucket, ()) for bucket, t in REPLY_TEMPLATES.items()}


SFT_MIX = {
    "strong_positive": 0.18,
    "mild_positive": 0.15,
    "neutral": 0.30,
    "mild_negative": 0.12,
    "strong_negative": 0.15,
    "off_topic": 0.10,
}
"""Bucket shares of the SFT completions: about 1/3 positive, 1/3 neutral, 1/3 negative or off topic,
so the SFT policy starts from a mix and PPO has room to improve."""

OFF_TOPIC_MOOD = {"strong_positive": 0.5, "mild_positive": 0.2, "neutral": 0.15, "strong_negative": 0.15}
"""Which adjectives an off-topic reply uses: mostly glowing, the trap a sentiment-only reward falls into."""

CLEAR_PAIRS = (
    ("strong_positive", "neutral"),
    ("strong_positive", "mild_negative"),
    ("strong_positive", "strong_negative"),
    ("strong_positive", "off_topic"),
    ("mild_positive", "strong_negative"),
    ("mild_positive", "off_topic"),
    ("neutral", "strong_negative"),
)
SUBTLE_PAIRS = (
    ("strong_positive", "mild_positive"),
    ("mild_positive", "neutral"),
    ("neutral", "mild_negative"),
    ("mild_negative", "strong_negative"),
    ("neutral", "off_topic"),
)
"""Preference pairs: two buckets for the same prompt. Clear pairs differ by ~1 in score, subtle ones
by ~0.1-0.4, which is where the noisy labels disagree with the noiseless annotator."""


@dataclass(frozen=True)
class Subject:
    name: str
    plural: bool
    category: str

    def slots(self) -> dict[str, str]:
        return {
            "s": self.name,
            "S": self.name[0].upper() + self.name[1:],
            "be": "are" if self.plural else "is",
            "it": "them" if self.plural else "it",
        }


ALL_SUBJECTS = tuple(
    Subject(name, plural, category)
    for category, c in CATEGORIES.items()
    for names, plural in ((c.singular, False), (c.plural, True))
    for name in names
)
HELDOUT = tuple(Subject(name, plural, category) for category, plural, names in HELDOUT_SUBJECTS for name in names)


def check_vocabulary() -> None:
    """Subjects share no content word, and none carries VADER sentiment (it would bias every reply)."""
    lexicon = SentimentIntensityAnalyzer().lexicon
    owner: dict[str, str] = {}
    for subject in ALL_SUBJECTS + HELDOUT:
        for word in topic_words(subject.name):
            if word in owner:
                raise SystemExit(f"subjects {owner[word]!r} and {subject.name!r} share the word {word!r}")
            owner[word] = subject.name
        for word in subject.name.lower().replace("-", " ").split():
            if word in lexicon:
                raise SystemExit(f"subject {subject.name!r}: {word!r} has VADER valence {lexicon[word]}")


def split_subjects(rng: random.Random) -> dict[str, list[Subject]]:
    """Shuffle each category's subjects and deal 15 % to validation, 15 % to test, the rest to train."""
    splits: dict[str, list[Subject]] = {split: [] for split in SPLITS}
    for category in CATEGORIES:
        subjects = [s for s in ALL_SUBJECTS if s.category == category]
        rng.shuffle(subjects)
        n_val = max(1, round(SPLIT_FRACTIONS["validation"] * len(subjects)))
        n_test = max(1, round(SPLIT_FRACTIONS["test"] * len(subjects)))
        splits["validation"] += subjects[:n_val]
        splits["test"] += subjects[n_val : n_val + n_test]
        splits["train"] += subjects[n_val + n_test :]
    return splits


def all_prompts(subjects: list[Subject]) -> list[tuple[str, Subject]]:
    return [(t.format(s=subject.name), subject) for subject in subjects for t in PROMPT_TEMPLATES]


def render(rng: random.Random, bucket: str, subject: Subject) -> str:
    """One reply of ``bucket`` about ``subject`` (for off_topic, the caller passes another subject)."""
    mood = bucket
    if bucket == "off_topic":
        mood = rng.choices(list(OFF_TOPIC_MOOD), weights=list(OFF_TOPIC_MOOD.values()))[0]
    category = CATEGORIES[subject.category]
    a1, a2 = rng.sample(ADJECTIVES[mood], 2)
    slots = subject.slots()
    slots.update(
        aspect=rng.choice(category.aspects),
        a1=a1,
        A1=a1.capitalize(),
        a2=a2,
        again=rng.choice(category.again).format(it=slots["it"]),
    )
    return rng.choice(REPLY_TEMPLATES[bucket]).format(**slots)


def reply(rng: random.Random, bucket: str, prompt: str, subject: Subject, pool: list[Subject]) -> str:
    """A reply of ``bucket`` to ``prompt``, checked against the annotator's own reading of it.

    Off-topic replies talk about another subject of ``pool`` (the split's own subjects, so no split
    mentions another's). A draw that the annotator would misread (an off-topic reply sharing a word
    with the prompt, a repeated content word) is redrawn.
    """
    others = [s for s in pool if s != subject]
    for _ in range(100):
        about = rng.choice(others) if bucket == "off_topic" else subject
        text = render(rng, bucket, about)
        if is_on_topic(prompt, text) == (bucket != "off_topic") and score_parts(prompt, text).penalty == 0:
            if len(text.split()) > MAX_REPLY_WORDS:
                raise SystemExit(f"reply over {MAX_REPLY_WORDS} words: {text!r}")
            return text
    raise SystemExit(f"could not write a {bucket} reply to {prompt!r} that the annotator reads as such")


Prompts = list[tuple[str, Subject]]
"""A split's prompts, each with its subject."""


def sft_rows(rng: random.Random, prompts: Prompts, n: int) -> list[dict]:
    pool = sorted({subject for _, subject in prompts}, key=lambda s: s.name)
    rows = []
    for bucket in rng.choices(list(SFT_MIX), weights=list(SFT_MIX.values()), k=n):
        prompt, subject = rng.choice(prompts)
        completion = reply(rng, bucket, prompt, subject, pool)
        rows.append({
            "prompt": prompt,
            "completion": completion,
            "_bucket": bucket,
            "_score": annotator_score(prompt, completion),
        })
    return rows


def pref_rows(rng: random.Random, prompts: Prompts, n: int, noise: float, subtle_fraction: float) -> list[dict]:
    """Pairs of replies to one prompt from two sentiment buckets, labelled by `prefer`."""
    pool = sorted({subject for _, subject in prompts}, key=lambda s: s.name)
    rows = []
    while len(rows) < n:
        prompt, subject = rng.choice(prompts)
        pairs = SUBTLE_PAIRS if rng.random() < subtle_fraction else CLEAR_PAIRS
        buckets = list(rng.choice(pairs))
        rng.shuffle(buckets)  # which bucket is "a" must not give the label away
        a, b = (reply(rng, bucket, prompt, subject, pool) for bucket in buckets)
        s_a, s_b = annotator_score(prompt, a), annotator_score(prompt, b)
        if abs(s_a - s_b) < MIN_PAIR_GAP:
            continue
        if prefer(prompt, a, b, rng, noise) == 0:
            chosen, rejected, gap = a, b, s_a - s_b
        else:
            chosen, rejected, gap = b, a, s_b - s_a
        rows.append({
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "_gap": gap,  # chosen - rejected score; < 0: the label goes against the noiseless annotator
            "_p_disagree": prob_prefer_a(min(s_a, s_b), max(s_a, s_b), noise),  # the lower score wins
        })
    return rows


def prompt_rows(rng: random.Random, prompts: Prompts, n: int, split: str) -> list[dict]:
    if n > len(prompts):
        raise SystemExit(f"--prompts-{split} {n}: only {len(prompts)} distinct {split} prompts exist")
    return [{"prompt": prompt} for prompt, _ in rng.sample(prompts, n)]


def heldout_rows(rng: random.Random) -> list[dict]:
    """Two prompts per held-out subject: one in a trained request form, one in a new form."""
    rows = []
    for subject in HELDOUT:
        for form, templates in (("trained", HELDOUT_TRAINED_FORMS), ("new", HELDOUT_TEMPLATES)):
            prompt = rng.choice(templates).format(s=subject.name)
            # The annotator must see the subject, not the new form's request words, as the topic.
            if topic_words(prompt) != topic_words(subject.name):
                raise SystemExit(f"{prompt!r}: the annotator reads its topic as {sorted(topic_words(prompt))}")
            rows.append({"prompt": prompt, "subject": subject.name, "form": form})
    return rows


def check_heldout(files: dict[str, list[dict]], heldout: list[dict]) -> None:
    """No other file mentions a held-out subject word, and no training prompt uses a new form."""
    words = set().union(*(topic_words(row["subject"]) for row in heldout))
    new_forms = [t.split("{s}")[0] for t in HELDOUT_TEMPLATES]
    for name, rows in files.items():
        for row in rows:
            text = " ".join(row.get(key, "") for key in ("prompt", "completion", "chosen", "rejected"))
            if shared := words & set(content_words(text)):
                raise SystemExit(f"{name}: mentions held-out subject words {sorted(shared)}")
            if any(row["prompt"].startswith(form) for form in new_forms):
                raise SystemExit(f"{name}: uses a held-out request form: {row['prompt']!r}")


def check_disjoint(files: dict[str, list[dict]]) -> None:
    """No prompt of one split appears in another, and no split's text mentions another's subject words."""
    prompts = {split: set() for split in SPLITS}
    subject_words = {split: set() for split in SPLITS}
    text_words = {split: set() for split in SPLITS}
    for name, rows in files.items():
        split = name.rsplit("_", 1)[1]
        for row in rows:
            prompts[split].add(row["prompt"])
            subject_words[split] |= topic_words(row["prompt"])
            for key in ("prompt", "completion", "chosen", "rejected"):
                text_words[split].update(content_words(row.get(key, "")))
    for first in SPLITS:
        for second in SPLITS:
            if first == second:
                continue
            if shared := prompts[first] & prompts[second]:
                raise SystemExit(f"{first} and {second} share prompts: {sorted(shared)[:3]}")
            if shared := subject_words[first] & text_words[second]:
                raise SystemExit(f"{second} files mention {first} subject words: {sorted(shared)[:3]}")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line; keys starting with "_" are bookkeeping for the README, not written."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            public = {k: v for k, v in row.items() if not k.startswith("_")}
            f.write(json.dumps(public, ensure_ascii=False) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/demo", help="output directory (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="every file is a function of the seed and the sizes")
    p.add_argument(
        "--noise", type=float, default=0.25,
        help="Bradley-Terry temperature of the labels (rlhf.demo.annotator.prefer); 0.25 -> ~7%% against the annotator",
    )
    p.add_argument(
        "--more-forms", action="store_true",
        help="six more request forms and more reply templates and adjectives (docs/ppo_levers.md)",
    )
    p.add_argument(
        "--subtle-fraction", type=float, default=0.3,
        help="share of preference pairs drawn from adjacent sentiment buckets (the ambiguous ones)",
    )
    sizes = p.add_argument_group("sizes (rows per file)")
    for name, default in (
        ("sft-train", 144), ("sft-validation", 32), ("sft-test", 32),
        ("prefs-train", 144), ("prefs-validation", 32), ("prefs-test", 64),
        ("prompts-train", 128), ("prompts-test", 32),
    ):
        sizes.add_argument(f"--{name}", type=int, default=default, metavar="N", help=f"default {default}")
    return p


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces this run: --out and --seed, plus every flag not at its default."""
    words = ["python", "-m", "rlhf.demo.make_data", "--out", str(args.out), "--seed", str(args.seed)]
    for dest, value in vars(args).items():
        if dest not in ("out", "seed") and value != parser.get_default(dest):
            words += ["--" + dest.replace("_", "-"), str(value)]
    return shlex.join(words)


README = """\
# Demo task data

Short replies to requests ("Write a short review of ramen.", "Describe Kyoto in one or two
sentences."), where people prefer replies that are **positive and on topic**. Small enough to run
SFT -> reward model -> PPO with SmolLM2-135M-Instruct on a 2-core CPU.

Made by (deterministic: same command, same bytes):

    {command}

## Who labelled it

Nobody: an automatic annotator (`rlhf/demo/annotator.py`) stands in for people.

- Score: the mean over the reply's sentences of VADER's compound (in [-1, 1]), plus 0.5 if the
  reply shares a word with the prompt's subject (the prompt's content words minus stop and request
  words) or minus 0.5 if it does not, minus 2 x (1 - share of distinct content words) for
  repetition; an empty reply scores -1.5.
- Length-neutral: the mean over sentences, not VADER's compound of the whole reply, which sums
  every word's valence and so prefers a longer reply at equal sentiment (on 511 replies of the demo
  SFT policy, two positive replies joined scored above both 96 % of the time with the whole-reply
  compound, 8 % with the mean; `python experiments/annotator_length.py --samples
  runs/demo/label/campaign`). The held-out judges of `rlhf eval` are unchanged.
- Label: reply a is chosen with probability sigmoid((score_a - score_b) / noise), noise = {noise}.

## Files

| file | rows | fields |
|---|---|---|
{file_table}

Subjects: {n_subjects} ({subject_counts} for train / validation / test), {n_templates} prompt
templates. Subjects are split per category, so no subject, prompt or subject word is shared
between splits (checked by the script).

## Held-out evaluation prompts

`prompts_heldout.jsonl` ({n_heldout} rows: prompt, subject, form) measures whether an alignment gain
generalizes. Its {n_heldout_subjects} subjects are used by no other file (no other file mentions any of
their words), and each is asked twice: once in one of the {n_heldout_forms} default request forms
(`form: trained`) and once in one of {n_new_templates} forms that no training prompt uses (`form: new`,
e.g. "{new_example}"). Keep it out of every training split: it is for evaluation only (checked by the
script, which also checks that the annotator reads each held-out prompt's topic as its subject).

## SFT completions

Each completion is drawn from a sentiment bucket, then from several templates and adjective lists:

| bucket | share | mean annotator score |
|---|---|---|
{bucket_table}

Mean annotator score of all SFT completions: **{sft_mean:.3f}** (train {sft_train_mean:.3f}); the
best replies score about 1.4, so PPO has room to improve.

## Preference labels

Pairs are two replies to the same prompt from two buckets: about {clear_pct:.0f} % clearly
different (e.g. strongly positive vs negative or off topic), {subtle_pct:.0f} % adjacent (e.g. mildly
positive vs neutral). Labels that go against the noiseless annotator (higher score wins), as
drawn and as expected from the label probabilities:

| file | pairs | disagree | expected |
|---|---|---|---|
{disagree_table}

Overall: **{disagree_pct:.1f} %** of pairs disagree (expected {expected_pct:.1f} %), like the
disagreement between human labellers. Mean score gap chosen - rejected: {gap:.3f}.
"""


def readme_text(command: str, noise: float, subtle_fraction: float, subjects: dict, files: dict,
                heldout: list[dict]) -> str:
    """data/demo/README.md: the command, the annotator's rule, sizes and the measured statistics."""
    sft = [row for split in SPLITS for row in files[f"sft_{split}"]]
    prefs = [row for split in SPLITS for row in files[f"prefs_{split}"]]
    fields = {"sft": "prompt, completion", "prefs": "prompt, chosen, rejected", "prompts": "prompt"}
    file_table = [f"| {name}.jsonl | {len(rows)} | {fields[name.split('_')[0]]} |" for name, rows in files.items()]
    bucket_table = [
        f"| {bucket} | {100 * mean([r['_bucket'] == bucket for r in sft]):.0f} % "
        f"| {mean([r['_score'] for r in sft if r['_bucket'] == bucket]):.2f} |"
        for bucket in SFT_MIX
    ]
    disagree_table = [
        f"| prefs_{split}.jsonl | {len(rows)} | {100 * mean([r['_gap'] < 0 for r in rows]):.1f} % "
        f"| {100 * mean([r['_p_disagree'] for r in rows]):.1f} % |"
        for split, rows in ((split, files[f"prefs_{split}"]) for split in SPLITS)
    ]
    return README.format(
        command=command,
        noise=noise,
        file_table="\n".join(file_table),
        n_subjects=sum(len(v) for v in subjects.values()),
        subject_counts=" / ".join(str(len(subjects[split])) for split in SPLITS),
        n_templates=len(PROMPT_TEMPLATES),
        n_heldout=len(heldout),
        n_heldout_forms=len(HELDOUT_TRAINED_FORMS),
        n_heldout_subjects=len({row["subject"] for row in heldout}),
        n_new_templates=len(HELDOUT_TEMPLATES),
        new_example=HELDOUT_TEMPLATES[0].format(s="Patagonia"),
        bucket_table="\n".join(bucket_table),
        sft_mean=mean([r["_score"] for r in sft]),
        sft_train_mean=mean([r["_score"] for r in files["sft_train"]]),
        clear_pct=100 * (1 - subtle_fraction),
        subtle_pct=100 * subtle_fraction,
        disagree_table="\n".join(disagree_table),
        disagree_pct=100 * mean([r["_gap"] < 0 for r in prefs]),
        expected_pct=100 * mean([r["_p_disagree"] for r in prefs]),
        gap=mean([r["_gap"] for r in prefs]),
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.noise < 0 or not 0 <= args.subtle_fraction <= 1:
        parser.error("--noise must be >= 0 and --subtle-fraction in [0, 1]")
    if args.more_forms:
        use_more_forms()
    check_vocabulary()

    def rng(name: str) -> random.Random:
        return random.Random(f"{args.seed}:{name}")  # one stream per output: sizes don't interact

    subjects = split_subjects(rng("split"))
    prompts = {split: all_prompts(subjects[split]) for split in SPLITS}
    files: dict[str, list[dict]] = {}
    for split in SPLITS:
        n_sft, n_prefs = getattr(args, f"sft_{split}"), getattr(args, f"prefs_{split}")
        files[f"sft_{split}"] = sft_rows(rng(f"sft_{split}"), prompts[split], n_sft)
        files[f"prefs_{split}"] = pref_rows(
            rng(f"prefs_{split}"), prompts[split], n_prefs, args.noise, args.subtle_fraction
        )
    for split in ("train", "test"):
        n_prompts = getattr(args, f"prompts_{split}")
        files[f"prompts_{split}"] = prompt_rows(rng(f"prompts_{split}"), prompts[split], n_prompts, split)
    check_disjoint(files)
    heldout = heldout_rows(rng("heldout"))
    check_heldout(files, heldout)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in {**files, "prompts_heldout": heldout}.items():
        write_jsonl(out / f"{name}.jsonl", rows)
        print(f"{out / name}.jsonl: {len(rows)} rows")
    readme = readme_text(command_line(parser, args), args.noise, args.subtle_fraction, subjects, files, heldout)
    (out / "README.md").write_text(readme, encoding="utf-8", newline="\n")

    sft = [row for split in SPLITS for row in files[f"sft_{split}"]]
    prefs = [row for split in SPLITS for row in files[f"prefs_{split}"]]
    print(f"SFT completions: mean annotator score {mean([r['_score'] for r in sft]):.3f}")
    disagree = mean([r["_gap"] < 0 for r in prefs])
    print(f"preference labels against the noiseless annotator: {100 * disagree:.1f} %")


if __name__ == "__main__":
    main()
