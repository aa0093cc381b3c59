"""A labeling campaign: one SQLite file in WAL mode, safe for many annotators and hard kills.

Data model (``campaign.sqlite`` inside the campaign directory)
--------------------------------------------------------------
- ``prompts``: each distinct prompt once, as JSON (a string or a list of chat messages), with the
  ``file:line`` it first came from.
- ``responses``: candidate replies to a prompt, each distinct text once per prompt, with its origin
  (``import <file:line>`` or ``generate <model dir>``).
- ``pairs``: two responses to the same prompt, ``response_a`` being the older one. ``rank`` is a
  random number fixing the order pairs are handed out in, so one prompt's pairs don't come in a row.
  Pairs chosen by a reward model (``rlhf label generate --select uncertain``) also keep its ``margin``
  (score of a minus score of b), which model scored them (``scored_by``) and how they were chosen
  (``chosen_as``: ``uncertain``, one of the smallest |margin|, or ``random``, drawn for an unbiased
  estimate); uncertain pairs are handed out before the others.
- ``assignments``: the one open item of each annotator (pair and which side is shown on the left),
  so a reload shows the same item in the same order and other annotators avoid it while it is fresh.
  A label or skip is taken only for the annotator's open item, with the side it was shown on.
- ``labels``: one row per (pair, annotator): ``choice`` is ``a``, ``b``, ``tie`` or ``both_bad`` in
  the pair's own terms; ``left_side`` says which response the annotator saw on the left.
  ``client_id`` is the UUID the page made for this submission; UNIQUE, so a retried request is
  answered with the stored label instead of storing it twice.
- ``skips``: pairs an annotator passed over; they are not shown to that annotator again.
- ``meta``: ``schema_version`` and ``k`` (labels wanted per pair). A version 1 campaign (no margin
  columns) is upgraded in place when opened.

Reliability: every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction with
``synchronous=FULL``, so a label the server acknowledged (HTTP 200 is sent only after COMMIT)
survives ``kill -9`` of the server and a power cut. Each call opens its own connection, so the store
can be used from the server's worker threads.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rlhf.core.errors import UserError

DB_NAME = "campaign.sqlite"
SCHEMA_VERSION = 2
CHOSEN_AS = ("uncertain", "random")
CHOICES = ("a", "b", "tie", "both_bad")
SIDES = ("a", "b")
_NO_PAIR = "prompt(s) with fewer than 2 distinct replies (no pair yet)"
ASSIGNMENT_LEASE_S = 15 * 60
"""An open item older than this no longer keeps other annotators away from its pair."""

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE prompts (
    id INTEGER PRIMARY KEY,
    prompt TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL
);
CREATE TABLE responses (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    text TEXT NOT NULL,
    origin TEXT NOT NULL,
    UNIQUE (prompt_id, text)
);
CREATE TABLE pairs (
    id INTEGER PRIMARY KEY,
    prompt_id INTEGER NOT NULL REFERENCES prompts(id),
    response_a INTEGER NOT NULL REFERENCES responses(id),
    response_b INTEGER NOT NULL REFERENCES responses(id),
    rank REAL NOT NULL,
    margin REAL,
    scored_by TEXT,
    chosen_as TEXT CHECK (chosen_as IN ('uncertain', 'random')),
    UNIQUE (response_a, response_b),
    CHECK (response_a < response_b)
);
CREATE TABLE assignments (
    annotator TEXT PRIMARY KEY,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    assigned_at REAL NOT NULL
);
CREATE INDEX assignments_pair ON assignments (pair_id);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL UNIQUE,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')),
    rationale TEXT,
    elapsed_ms INTEGER,
    created_at REAL NOT NULL,
    UNIQUE (pair_id, annotator)
);
CREATE TABLE skips (
    id INTEGER PRIMARY KEY,
    client_id TEXT NOT NULL UNIQUE,
    pair_id INTEGER NOT NULL REFERENCES pairs(id),
    annotator TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (pair_id, annotator)
);
"""

# Version 1 -> 2: a reward model's margin on the pair, and how the pair was chosen.
_MIGRATE_1_TO_2 = """
ALTER TABLE pairs ADD COLUMN margin REAL;
ALTER TABLE pairs ADD COLUMN scored_by TEXT;
ALTER TABLE pairs ADD COLUMN chosen_as TEXT CHECK (chosen_as IN ('uncertain', 'random'));
UPDATE meta SET value = '2' WHERE key = 'schema_version';
"""

# The next pair for an annotator: one they have neither labeled nor skipped, with fewer than k labels.
# Pairs that other annotators' fresh open items would fill up come last ("in flight, lightly"), then
# pairs already partly labeled (so agreement data arrives early), then pairs a reward model was least
# sure about (what labels teach it most), then the random rank.
_NEXT_PAIR = """
WITH candidates AS (
    SELECT p.id, p.rank, p.chosen_as,
        (SELECT COUNT(*) FROM labels l WHERE l.pair_id = p.id) AS n_labels,
        (SELECT COUNT(*) FROM assignments s
            WHERE s.pair_id = p.id AND s.annotator != :who AND s.assigned_at > :fresh) AS n_open
    FROM pairs p
    WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = p.id AND l.annotator = :who)
      AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.pair_id = p.id AND s.annotator = :who)
)
SELECT id FROM candidates WHERE n_labels < :k
ORDER BY (n_labels + n_open >= :k), n_labels DESC, (chosen_as IS NOT 'uncertain'), rank
LIMIT 1
"""


class UnknownPair(Exception):
    """A submission names a pair the campaign doesn't have (HTTP 404)."""


class LabelConflict(Exception):
    """A submission contradicts what is stored: a pair labeled twice, a client id reused, or a pair or
    left side other than the annotator's open item (HTTP 409)."""


@dataclass
class AddResult:
    """What one import or generate call added to a campaign."""

    prompts: int = 0
    responses: int = 0
    pairs: int = 0
    duplicate_responses: int = 0
    """Replies whose text (ignoring surrounding white space) another reply to the same prompt has."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Other things left out, by reason (e.g. empty replies, prompts with fewer than 2 replies)."""
    selection: dict[str, float] = field(default_factory=dict)
    """With pairs chosen by a reward model: pool size, how many uncertain and random, the widest |margin| kept."""

    def summary(self) -> str:
        parts = [f"added {self.prompts} prompt(s), {self.responses} response(s), {self.pairs} pair(s)"]
        if self.selection:
            sel = self.selection
            parts.append(f"chose {sel['uncertain']} uncertain pair(s) (|margin| <= {sel['max_uncertain_margin']:.3g}) "
                         f"and {sel['random']} random pair(s) of {sel['pool']} candidate pair(s)")
        if self.duplicate_responses:
            parts.append(f"skipped {self.duplicate_responses} duplicate response(s)")
        parts += [f"skipped {n} {reason}" for reason, n in self.skipped.items() if n]
        return "; ".join(parts)


def prompt_json(prompt: str | list[dict]) -> str:
    """The stored (and de-duplicating) form of a prompt: a JSON string or message list."""
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


class Campaign:
    """A campaign directory; every method opens its own short-lived SQLite connection."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db_path = self.path / DB_NAME
        if not self.db_path.is_file():
            raise UserError(
                f"{self.path}: expected a labeling campaign (a directory with {DB_NAME}), found "
                f"{'no ' + DB_NAME if self.path.is_dir() else 'no such directory'}; "
                "create one with `rlhf label import` or `rlhf label generate`"
            )
        try:
            with self._connect() as conn:
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.db_path}: expected a labeling campaign database, found {e}")
        if version is not None and int(version[0]) == 1:
            self._migrate_from_1()
            version = (str(SCHEMA_VERSION),)
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise UserError(
                f"{self.db_path}: expected campaign schema version {SCHEMA_VERSION}, "
                f"found {None if version is None else version[0]}"
            )

    def _migrate_from_1(self) -> None:
        """Add version 2's pair columns to a version 1 campaign, in one transaction (None for old pairs)."""
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have upgraded it while this one waited for the lock.
                if conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1":
                    for statement in filter(str.strip, _MIGRATE_1_TO_2.split(";")):
                        conn.execute(statement)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @classmethod
    def create_or_open(cls, path: str | Path) -> "Campaign":
        """Open the campaign at ``path``, creating the directory and an empty database if needed."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: expected a campaign directory, found a file")
        db_path = path / DB_NAME
        if not db_path.exists():
            path.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db_path, isolation_level=None)
            try:
                # WAL is a property of the file: set once, every later connection uses it.
                conn.execute("PRAGMA journal_mode=WAL")
                # One transaction: a campaign exists with its schema version, or not at all.
                conn.executescript(
                    f"BEGIN; {_SCHEMA} INSERT INTO meta (key, value) VALUES "
                    f"('schema_version', '{SCHEMA_VERSION}'), ('k', '1'); COMMIT;"
                )
            finally:
                conn.close()
        return cls(path)

    # ------------------------------------------------------------------------------------------
    # Connections
    # ------------------------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        # FULL: the WAL is fsynced at every COMMIT, so an acknowledged label survives a power cut,
        # not only a killed process. One fsync per human label is nothing.
        conn.execute("PRAGMA synchronous=FULL")
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. IMMEDIATE takes the write lock up front, so two writers never
        deadlock upgrading a read lock; the other waits (busy timeout) instead."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ------------------------------------------------------------------------------------------
    # Settings
    # ------------------------------------------------------------------------------------------

    @property
    def k(self) -> int:
        """How many different annotators should label each pair."""
        with self._connect() as conn:
            return int(conn.execute("SELECT value FROM meta WHERE key = 'k'").fetchone()[0])

    def set_k(self, k: int) -> None:
        if k < 1:
            raise UserError(f"k: expected at least 1 annotator per pair, found {k}")
        with self._write() as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'k'", (str(k),))

    # ------------------------------------------------------------------------------------------
    # Filling the campaign
    # ------------------------------------------------------------------------------------------

    def add_responses(self, items: list[tuple[str, str | list[dict], list[str], str]],
                      max_pairs_per_prompt: int | None = None, seed: int = 0) -> AddResult:
        """Add ``(source, prompt, replies, origin)`` items and pair the new replies, all in one
        transaction.

        Each new reply is paired with every other reply to the same prompt, older ones included, so
        replies added later (e.g. from another model) are compared with earlier ones. With
        ``max_pairs_per_prompt``, a seeded random subset of each prompt's new pairs is kept.
        Replies already stored for the prompt, or repeated in ``replies``, are counted as duplicates.
        """
        rng = random.Random(seed)
        result = AddResult()
        with self._write() as conn:
            for source, prompt, replies, origin in items:
                key = prompt_json(prompt)
                row = conn.execute("SELECT id FROM prompts WHERE prompt = ?", (key,)).fetchone()
                if row is None:
                    prompt_id = conn.execute(
                        "INSERT INTO prompts (prompt, source) VALUES (?, ?)", (key, source)
                    ).lastrowid
                    result.prompts += 1
                else:
                    prompt_id = row["id"]
                old = {r["text"].strip(): r["id"] for r in conn.execute(
                    "SELECT id, text FROM responses WHERE prompt_id = ?", (prompt_id,))}
                new_ids: set[int] = set()
                for text in replies:
                    if text.strip() in old:
                        result.duplicate_responses += 1
                        continue
                    rid = conn.execute(
                        "INSERT INTO responses (prompt_id, text, origin) VALUES (?, ?, ?)",
                        (prompt_id, text, origin),
                    ).lastrowid
                    old[text.strip()] = rid
                    new_ids.add(rid)
                    result.responses += 1
                all_ids = sorted(old.values())
                # Pairs with at least one new reply; (a, b) with a < b, as the table requires.
                pairs = [(a, b) for i, a in enumerate(all_ids) for b in all_ids[i + 1:]
                         if a in new_ids or b in new_ids]
                if max_pairs_per_prompt is not None and len(pairs) > max_pairs_per_prompt:
                    pairs = sorted(rng.sample(pairs, max_pairs_per_prompt))
                for a, b in pairs:
                    conn.execute(
                        "INSERT INTO pairs (prompt_id, response_a, response_b, rank) VALUES (?, ?, ?, ?)",
                        (prompt_id, a, b, rng.random()),
                    )
                result.pairs += len(pairs)
                if len(all_ids) < 2:
                    result.skipped[_NO_PAIR] = result.skipped.get(_NO_PAIR, 0) + 1
        return result

    def add_pairs(self, items: list[dict], seed: int = 0) -> AddResult:
        """Add chosen pairs, each with its replies, in one transaction.

        Each item: ``source``, ``prompt``, ``a``, ``b`` (reply texts), ``origin_a``, ``origin_b``, and
        optionally ``margin`` (a reward model's score of ``a`` minus that of ``b``), ``scored_by`` and
        ``chosen_as`` (``uncertain`` or ``random``). A reply the prompt already has (ignoring
        surrounding white space) is reused; the pair is stored with the older reply as ``response_a``,
        its margin's sign turned to match. A pair the campaign already has is counted and left out.
        """
        rng = random.Random(seed)
        result = AddResult()
        with self._write() as conn:
            for item in items:
                if item.get("chosen_as") not in (None, *CHOSEN_AS):
                    raise ValueError(f"chosen_as: expected one of {CHOSEN_AS} or None, found {item['chosen_as']!r}")
                key = prompt_json(item["prompt"])
                row = conn.execute("SELECT id FROM prompts WHERE prompt = ?", (key,)).fetchone()
                if row is None:
                    prompt_id = conn.execute("INSERT INTO prompts (prompt, source) VALUES (?, ?)",
                                             (key, item["source"])).lastrowid
                    result.prompts += 1
                else:
                    prompt_id = row["id"]
                ids = []
                for side in ("a", "b"):
                    text = item[side]
                    found = next((r["id"] for r in conn.execute(
                        "SELECT id, text FROM responses WHERE prompt_id = ?", (prompt_id,))
                        if r["text"].strip() == text.strip()), None)
                    if found is None:
                        found = conn.execute("INSERT INTO responses (prompt_id, text, origin) VALUES (?, ?, ?)",
                                             (prompt_id, text, item[f"origin_{side}"])).lastrowid
                        result.responses += 1
                    ids.append(found)
                (a, b), margin = ids, item.get("margin")
                if a == b:
                    result.duplicate_responses += 1
                    continue
                if a > b:  # the table keeps the older reply as response_a: the margin follows it
                    a, b, margin = b, a, None if margin is None else -margin
                if conn.execute("SELECT 1 FROM pairs WHERE response_a = ? AND response_b = ?", (a, b)).fetchone():
                    result.skipped["pair(s) already in the campaign"] = (
                        result.skipped.get("pair(s) already in the campaign", 0) + 1)
                    continue
                conn.execute(
                    "INSERT INTO pairs (prompt_id, response_a, response_b, rank, margin, scored_by, chosen_as) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (prompt_id, a, b, rng.random(), margin, item.get("scored_by"), item.get("chosen_as")),
                )
                result.pairs += 1
        return result

    def pair_texts(self) -> set[tuple[str, str, str]]:
        """``(prompt json, reply, reply)`` of every pair (stripped replies, sorted), to leave out pairs it has."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT q.prompt, ra.text AS a, rb.text AS b FROM pairs p JOIN prompts q ON q.id = p.prompt_id "
                "JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b").fetchall()
        return {(r["prompt"], *sorted((r["a"].strip(), r["b"].strip()))) for r in rows}

    # ------------------------------------------------------------------------------------------
    # Labeling
    # ------------------------------------------------------------------------------------------

    def next_item(self, annotator: str, k: int, rng: random.Random | None = None) -> dict | None:
        """The annotator's open item, or a new one; None when nothing is left for them.

        A new item shows the pair's replies in a random left/right order (against position bias),
        drawn once and kept with the open item.
        """
        rng = rng or random.SystemRandom()
        now = time.time()
        with self._write() as conn:
            open_item = conn.execute(
                "SELECT s.pair_id, s.left_side FROM assignments s WHERE s.annotator = ? "
                "AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.pair_id = s.pair_id AND l.annotator = s.annotator) "
                "AND NOT EXISTS (SELECT 1 FROM skips k WHERE k.pair_id = s.pair_id AND k.annotator = s.annotator)",
                (annotator,),
            ).fetchone()
            if open_item is not None:
                pair_id, left_side = open_item["pair_id"], open_item["left_side"]
            else:
                row = conn.execute(
                    _NEXT_PAIR, {"who": annotator, "k": k, "fresh": now - ASSIGNMENT_LEASE_S}
                ).fetchone()
                if row is None:
                    conn.execute("DELETE FROM assignments WHERE annotator = ?", (annotator,))
                    return None
                pair_id, left_side = row["id"], rng.choice(SIDES)
                conn.execute(
                    "INSERT OR REPLACE INTO assignments (annotator, pair_id, left_side, assigned_at) "
                    "VALUES (?, ?, ?, ?)",
                    (annotator, pair_id, left_side, now),
                )
            pair = self._pair(conn, pair_id)
        right_side = "b" if left_side == "a" else "a"
        return {
            "pair_id": pair_id,
            "prompt": pair["prompt"],
            "left": {"side": left_side, "text": pair[left_side]},
            "right": {"side": right_side, "text": pair[right_side]},
        }

    @staticmethod
    def _open_item_side(conn: sqlite3.Connection, annotator: str, pair_id: int) -> str:
        """The left side of the annotator's open item, which must be ``pair_id``.

        Raises UnknownPair for a pair the campaign lacks, LabelConflict for one the annotator has
        already labeled or skipped, or was never handed (only ``next_item`` hands pairs out).
        """
        if conn.execute("SELECT 1 FROM pairs WHERE id = ?", (pair_id,)).fetchone() is None:
            raise UnknownPair(f"no pair {pair_id} in this campaign")
        for table, done in (("labels", "labeled"), ("skips", "skipped")):
            if conn.execute(f"SELECT 1 FROM {table} WHERE pair_id = ? AND annotator = ?",
                            (pair_id, annotator)).fetchone() is not None:
                raise LabelConflict(f"{annotator} has already {done} pair {pair_id}")
        row = conn.execute("SELECT left_side FROM assignments WHERE annotator = ? AND pair_id = ?",
                           (annotator, pair_id)).fetchone()
        if row is None:
            raise LabelConflict(f"pair {pair_id} is not {annotator}'s open item: labels and skips are "
                                "taken only for the pair GET /api/next handed out")
        return row["left_side"]

    @staticmethod
    def _pair(conn: sqlite3.Connection, pair_id: int) -> dict:
        row = conn.execute(
            "SELECT q.prompt, ra.text AS a, rb.text AS b FROM pairs p "
            "JOIN prompts q ON q.id = p.prompt_id "
            "JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b "
            "WHERE p.id = ?",
            (pair_id,),
        ).fetchone()
        return {"prompt": json.loads(row["prompt"]), "a": row["a"], "b": row["b"]}

    def submit_label(self, client_id: str, annotator: str, pair_id: int, choice: str, left_side: str,
                     rationale: str | None = None, elapsed_ms: int | None = None) -> tuple[dict, bool]:
        """Store one label in its own transaction; returns ``(stored label, was_duplicate)``.

        Idempotent on ``client_id``: a retry of an acknowledged (or committed but unacknowledged)
        submission returns the stored row and stores nothing. Otherwise the pair must be the
        annotator's open item and ``left_side`` the side it was shown on (LabelConflict if not), so a
        client can neither push a pair it was not given past k nor skew the position-bias figures.
        """
        if choice not in CHOICES:
            raise ValueError(f"choice: expected one of {CHOICES}, found {choice!r}")
        if left_side not in SIDES:
            raise ValueError(f"left_side: expected one of {SIDES}, found {left_side!r}")
        with self._write() as conn:
            stored = conn.execute("SELECT * FROM labels WHERE client_id = ?", (client_id,)).fetchone()
            if stored is not None:
                if stored["pair_id"] != pair_id or stored["annotator"] != annotator:
                    raise LabelConflict(f"client id {client_id} was already used for another label")
                return dict(stored), True
            # Checked inside the transaction: the open item can't change between the check and the INSERT.
            shown_left = self._open_item_side(conn, annotator, pair_id)
            if left_side != shown_left:
                raise LabelConflict(f"left_side: expected '{shown_left}', the reply shown on the left of "
                                    f"{annotator}'s open item (pair {pair_id}), found '{left_side}'")
            label_id = conn.execute(
                "INSERT INTO labels (client_id, pair_id, annotator, choice, left_side, rationale, "
                "elapsed_ms, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (client_id, pair_id, annotator, choice, left_side, rationale or None, elapsed_ms, time.time()),
            ).lastrowid
            conn.execute("DELETE FROM assignments WHERE annotator = ? AND pair_id = ?", (annotator, pair_id))
            stored = conn.execute("SELECT * FROM labels WHERE id = ?", (label_id,)).fetchone()
        return dict(stored), False

    def submit_skip(self, client_id: str, annotator: str, pair_id: int) -> bool:
        """Record that the annotator skipped the pair; returns whether it was a retried duplicate.

        As with labels, only the annotator's open item can be skipped (LabelConflict otherwise).
        """
        with self._write() as conn:
            stored = conn.execute("SELECT pair_id, annotator FROM skips WHERE client_id = ?",
                                  (client_id,)).fetchone()
            if stored is not None:
                if stored["pair_id"] != pair_id or stored["annotator"] != annotator:
                    raise LabelConflict(f"client id {client_id} was already used for another skip")
                return True
            self._open_item_side(conn, annotator, pair_id)
            conn.execute(
                "INSERT INTO skips (client_id, pair_id, annotator, created_at) VALUES (?, ?, ?, ?)",
                (client_id, pair_id, annotator, time.time()),
            )
            conn.execute("DELETE FROM assignments WHERE annotator = ? AND pair_id = ?", (annotator, pair_id))
        return False

    def progress(self, k: int, annotator: str | None = None) -> dict:
        """Labels counted towards the target (at most k per pair), the target, and the annotator's own."""
        with self._connect() as conn:
            pairs = conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0]
            per_pair = conn.execute(
                "SELECT COUNT(*) AS n FROM labels GROUP BY pair_id").fetchall()
            mine = 0
            if annotator is not None:
                mine = conn.execute("SELECT COUNT(*) FROM labels WHERE annotator = ?",
                                    (annotator,)).fetchone()[0]
        return {
            "pairs": pairs,
            "k": k,
            "labeled": sum(min(r["n"], k) for r in per_pair),
            "target": pairs * k,
            "pairs_done": sum(1 for r in per_pair if r["n"] >= k),
            "mine": mine,
        }

    # ------------------------------------------------------------------------------------------
    # Reading everything back (stats, export)
    # ------------------------------------------------------------------------------------------

    def pairs(self) -> list[dict]:
        """Every pair with its prompt, both texts, and the reward model's margin and how it was chosen
        (None for pairs no reward model chose)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT p.id, q.prompt, ra.text AS a, rb.text AS b, p.margin, p.scored_by, p.chosen_as FROM pairs p "
                "JOIN prompts q ON q.id = p.prompt_id "
                "JOIN responses ra ON ra.id = p.response_a JOIN responses rb ON rb.id = p.response_b "
                "ORDER BY p.id"
            ).fetchall()
        return [{"pair_id": r["id"], "prompt": json.loads(r["prompt"]), "a": r["a"], "b": r["b"],
                 "margin": r["margin"], "scored_by": r["scored_by"], "chosen_as": r["chosen_as"]} for r in rows]

    def labels(self) -> list[dict]:
        """Every label, oldest first."""
        with self._connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM labels ORDER BY id")]

    def skips(self) -> list[dict]:
        with self._connect() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM skips ORDER BY id")]
