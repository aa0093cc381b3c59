"""`rlhf label generate --select uncertain`: pairs chosen where the reward model is least sure, with a
random share; margins stored; uncertain pairs handed out first; stats split by how pairs were chosen."""

import json
import random
import sqlite3
from contextlib import closing

import pytest

from rlhf.label import store
from rlhf.label.annotate import annotate_campaign
from rlhf.label.cli import main
from rlhf.label.export import export_rows
from rlhf.label.select import candidate_pairs, select_pairs
from rlhf.label.stats import campaign_stats, reward_model_accuracy
from rlhf.label.store import Campaign


def test_select_keeps_the_smallest_margins_and_a_random_share_of_the_whole_pool():
    margins = [3.0, -0.1, 0.5, -2.0, 0.05, 1.0, -0.3, 4.0, 0.0, -5.0]
    chosen = select_pairs(margins, budget=5, random_share=0.4, rng=random.Random(1))
    random_ones = [i for i, how in chosen if how == "random"]
    uncertain = [i for i, how in chosen if how == "uncertain"]
    assert len(random_ones) == 2 and len(uncertain) == 3  # round(5 * 0.4) = 2
    # The uncertain ones are the smallest |margin| among the pairs not drawn at random, smallest first.
    rest = sorted((i for i in range(len(margins)) if i not in random_ones), key=lambda i: abs(margins[i]))
    assert uncertain == rest[:3]
    # The random share is a sample of the WHOLE pool: over many seeds, the most uncertain pair (index 8,
    # margin 0) is drawn at random as often as any other (2 of 10 pairs each time: about 20 %).
    draws = [i for seed in range(2000) for i, how in select_pairs(margins, 5, 0.4, random.Random(seed))
             if how == "random"]
    assert abs(draws.count(8) / 2000 - 0.2) < 0.03 and abs(draws.count(7) / 2000 - 0.2) < 0.03
    # No random share: purely the smallest margins; a pool smaller than the budget: everything.
    assert select_pairs(margins, 3, 0.0) == [(8, "uncertain"), (4, "uncertain"), (1, "uncertain")]
    assert len(select_pairs(margins[:2], 10, 0.5)) == 2
    with pytest.raises(ValueError):
        select_pairs(margins, 0)


def test_candidate_pairs_skip_empty_and_identical_replies():
    assert candidate_pairs(["a", " a ", "", "b", "c"]) == [(0, 3), (0, 4), (3, 4)]


def _pair(prompt, a, b, margin, how):
    return {"source": "test", "prompt": prompt, "a": a, "b": b, "origin_a": "m1", "origin_b": "m2",
            "margin": margin, "scored_by": "rm", "chosen_as": how}


def test_pairs_store_margin_and_how_chosen_and_uncertain_come_first(tmp_path):
    campaign = Campaign.create_or_open(tmp_path / "c")
    campaign.add_responses([("f:1", "Review tea.", ["Tea is nice.", "Tea is bad."], "import")])  # a plain pair
    result = campaign.add_pairs([
        _pair("Review tea.", "Tea is great.", "Tea is nice.", 0.7, "random"),  # "Tea is nice." is older
        _pair("Review pizza.", "Pizza is good.", "Pizza is dull.", -0.2, "uncertain"),
        _pair("Review pizza.", "Pizza is good.", "Pizza is fine.", 0.1, "uncertain"),
        _pair("Review tea.", "Tea is nice.", "Tea is great.", -0.7, "random"),  # the same pair again
    ], seed=3)
    assert (result.pairs, result.skipped) == (3, {"pair(s) already in the campaign": 1})
    pairs = {(p["a"], p["b"]): p for p in campaign.pairs()}
    # Stored with the older reply as a: the margin's sign follows (score a - score b).
    assert pairs["Tea is nice.", "Tea is great."]["margin"] == -0.7
    assert pairs["Tea is nice.", "Tea is great."]["chosen_as"] == "random"
    assert pairs["Pizza is good.", "Pizza is dull."]["margin"] == -0.2
    assert pairs["Tea is nice.", "Tea is bad."]["chosen_as"] is None

    campaign.set_k(2)
    order = []
    while (item := campaign.next_item("ann", 2)) is not None:
        order.append(item["pair_id"])
        campaign.submit_label(f"c{item['pair_id']}", "ann", item["pair_id"], "a", item["left"]["side"])
    how = {p["pair_id"]: p["chosen_as"] for p in campaign.pairs()}
    assert [how[i] for i in order[:2]] == ["uncertain", "uncertain"]
    assert sorted(how[i] or "" for i in order[2:]) == ["", "random"]
    # A partly labeled pair still comes before an uncertain one nobody has touched.
    extra = campaign.add_pairs([_pair("Review soup.", "Soup is good.", "Soup is bad.", 0.0, "uncertain")])
    assert extra.pairs == 1
    first = campaign.next_item("other", 2)
    assert first["pair_id"] in order and how[first["pair_id"]] == "uncertain"


def test_version_1_campaign_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old"
    path.mkdir()
    v1 = store._SCHEMA.replace("    margin REAL,\n    scored_by TEXT,\n"
                               "    chosen_as TEXT CHECK (chosen_as IN ('uncertain', 'random')),\n", "")
    assert "margin" not in v1
    with closing(sqlite3.connect(path / store.DB_NAME, isolation_level=None)) as conn:
        conn.executescript(f"BEGIN; {v1} INSERT INTO meta VALUES ('schema_version', '1'), ('k', '1'); COMMIT;")
    campaign = Campaign(path)
    campaign.add_responses([("f:1", "Hi", ["Hello.", "Hey."], "import")])
    assert campaign.pairs()[0]["margin"] is None
    campaign.add_pairs([_pair("Hi", "Yo.", "Hello.", 0.5, "uncertain")])
    assert Campaign(path).pairs()[-1]["chosen_as"] == "uncertain"


def test_stats_split_reward_model_accuracy_by_how_pairs_were_chosen(tmp_path, capsys):
    pairs = [
        {"pair_id": 1, "margin": 0.1, "chosen_as": "uncertain"},   # a won: right
        {"pair_id": 2, "margin": 0.2, "chosen_as": "uncertain"},   # b won: wrong
        {"pair_id": 3, "margin": -1.5, "chosen_as": "random"},     # b won: right
        {"pair_id": 4, "margin": 2.0, "chosen_as": "random"},      # a won: right
        {"pair_id": 5, "margin": 0.3, "chosen_as": "random"},      # tie: not decided
        {"pair_id": 6, "margin": 0.0, "chosen_as": "uncertain"},   # margin 0, b won: half
        {"pair_id": 7, "margin": None, "chosen_as": None},          # no reward model: left out
    ]
    labels = [{"pair_id": i, "choice": c} for i, c in [(1, "a"), (2, "b"), (3, "b"), (4, "a"), (5, "tie"),
                                                        (6, "b"), (7, "a")]]
    report = reward_model_accuracy(pairs, labels)
    assert report["uncertain"] == {"pairs": 3, "decided": 3, "accuracy": pytest.approx(1.5 / 3)}
    assert report["random"] == {"pairs": 3, "decided": 2, "accuracy": 1.0}
    assert report["all"] == {"pairs": 6, "decided": 5, "accuracy": pytest.approx(3.5 / 5)}
    assert reward_model_accuracy([{"pair_id": 1, "margin": None}], labels) == {}

    # Through a campaign and the command, with the demo annotator labeling (noise 0: the higher score wins).
    campaign = Campaign.create_or_open(tmp_path / "c")
    campaign.add_pairs([
        _pair("Write a short review of pizza.", "Pizza is wonderful.", "Pizza is awful.", 1.0, "random"),
        _pair("Write a short review of tea.", "Tea is wonderful.", "Tea is awful.", -1.0, "uncertain"),
    ])
    assert annotate_campaign(campaign, noise=0.0) == 2
    assert annotate_campaign(campaign, noise=0.0) == 0  # nothing left: a rerun stores nothing
    stats = campaign_stats(campaign)["reward_model_accuracy"]
    assert stats["random"]["accuracy"] == 1.0 and stats["uncertain"]["accuracy"] == 0.0
    rows, _ = export_rows(campaign)
    assert [(r["chosen"], r["chosen_as"], r["margin"]) for r in rows] == [
        ("Pizza is wonderful.", "random", 1.0), ("Tea is wonderful.", "uncertain", -1.0)]
    assert main(["stats", str(campaign.path), "--png", str(tmp_path / "s.png")]) == 0
    out = capsys.readouterr().out
    assert "random: 1 on 1 pairs" in out and "uncertain: 0 on 1 pairs" in out


def _tiny_reward_model(path, seed=1):
    """A random-weight sequence-classification model: a reward model load_run accepts as it is."""
    import torch
    from rlhf.demo.tiny_model import build_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_generate_select_uncertain_from_two_models(tmp_path, tiny_model_dir, capsys):
    from rlhf.core.runs import load_run
    from rlhf.core.scoring import score_replies

    reward = _tiny_reward_model(tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a short review of {w}."}) + "\n"
                               for w in ("tea", "pizza", "coffee", "bread", "soup", "cheese")))
    out = tmp_path / "campaign"
    from rlhf.demo.tiny_model import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", seed=1)  # a second "policy"
    argv = ["generate", "--model", str(tiny_model_dir), "--model", str(other), "--prompts", str(prompts),
            "--n", "2", "--max_new_tokens", "6", "--select", "uncertain", "--reward_model", str(reward),
            "--budget", "10", "--random_share", "0.3", "--out", str(out)]
    assert main(argv) == 0
    summary = capsys.readouterr().out
    assert "chose 7 uncertain pair(s)" in summary and "and 3 random pair(s) of" in summary
    pairs = Campaign(out).pairs()
    assert len(pairs) == 10
    assert sorted(p["chosen_as"] for p in pairs) == ["random"] * 3 + ["uncertain"] * 7
    # The stored margin is the reward model's score of a minus that of b.
    model, tokenizer = load_run(str(reward), "seq-cls")
    a = score_replies(model, tokenizer, [p["prompt"] for p in pairs], [p["a"] for p in pairs])
    b = score_replies(model, tokenizer, [p["prompt"] for p in pairs], [p["b"] for p in pairs])
    assert [p["margin"] for p in pairs] == pytest.approx([x - y for x, y in zip(a, b)], abs=1e-4)
    assert all(p["scored_by"] == str(reward) for p in pairs)
    # Every uncertain pair is at most as far apart as any pool pair that was left out: a second call
    # (same seed, so the same replies) finds only those left out, and none has a smaller |margin|.
    widest = max(abs(p["margin"]) for p in pairs if p["chosen_as"] == "uncertain")
    assert main(argv[:-4] + ["--budget", "100", "--random_share", "0", "--out", str(out)]) == 0
    rest = [p for p in Campaign(out).pairs()[10:]]
    assert rest and min(abs(p["margin"]) for p in rest) >= widest - 1e-6
    # Flags that only make sense together.
    assert main(["generate", "--model", str(other), "--prompts", str(prompts), "--select", "uncertain",
                 "--budget", "10", "--out", str(tmp_path / "none")]) == 2
    assert "expected --reward_model" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert main(["generate", "--model", str(other), "--prompts", str(prompts), "--select", "uncertain",
                 "--reward_model", str(other), "--budget", "10", "--out", str(tmp_path / "none")]) == 2
    assert "--reward_model: expected a reward model" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_the_page_api_hands_out_uncertain_pairs_first(tmp_path):
    from fastapi.testclient import TestClient

    from rlhf.label.app import create_app

    campaign = Campaign.create_or_open(tmp_path / "c")
    campaign.add_responses([("f:1", "Review tea.", ["Tea is nice.", "Tea is bad.", "Tea."], "import")], seed=1)
    campaign.add_pairs([_pair("Review tea.", "Tea is great.", "Tea is dull.", 0.7, "random"),
                        _pair("Review soup.", "Soup is good.", "Soup is dull.", 0.01, "uncertain")], seed=2)
    client = TestClient(create_app(campaign))
    item = client.get("/api/next", headers={"X-Annotator": "ann"}).json()["item"]
    assert {item["left"]["text"], item["right"]["text"]} == {"Soup is good.", "Soup is dull."}
