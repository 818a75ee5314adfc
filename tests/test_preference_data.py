"""Tests of rlhf/preference_data.py, preference_formats.py and pair_batches.py: every record
format from small files, dropped pairs and their counts, bad records, fitting to block_size,
batches, the held-out split, and the real preference sets of the data kit.

Tests marked needs_data read $GPTLAB_DATA_DIR and skip when it is unset.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from gpt.catalog import CATALOG, DATA_DIR_ENV
from gpt.chat import render_chat, render_prompt
from gpt.tokenizer import Tokenizer
from rlhf.pair_batches import PAD_ID, PairBatches, collate_pairs, fit_pair, pack_sequences, tokenize_pairs
from rlhf.preference_data import load_pairs, split_heldout
from rlhf.preference_formats import PreferencePair, parse_hh_transcript

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get(DATA_DIR_ENV)
needs_data = pytest.mark.skipif(not DATA_DIR, reason=f"{DATA_DIR_ENV} is not set; point it at the data kit")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, records: list) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def write_json(path: Path, content) -> str:
    path.write_text(json.dumps(content), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer trained on this repository's alignment code: enough merges for short text."""
    text = "".join(p.read_text() for p in sorted((REPO / "rlhf").glob("*.py")))
    return Tokenizer.train([text[i:i + 500] for i in range(0, len(text), 500)], vocab_size=400)


# ---------------------------------------------------------------------------------------------
# Record formats


def test_prompt_chosen_rejected_strings(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    pairs, stats = load_pairs(path)
    assert pairs == [PreferencePair([user("2+2?")], "4", "5", f"{path}, record 0 (line 1)")]
    assert stats.records == 1


def test_prompt_and_message_replies(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello."), user("2+2?")]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": prompt, "chosen": [assistant("4")], "rejected": [assistant("5")]},
        {"prompt": "2+2?", "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
    ])
    pairs, _ = load_pairs(path)
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (prompt, "4", "5")
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ([user("2+2?")], "4", "5")


def test_implicit_prompt_message_lists(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": [user("Hi"), assistant("Hello."), user("2+2?"), assistant("4")],
         "rejected": [user("Hi"), assistant("Hello."), user("2+2?"), assistant("5")]},
    ])
    pair = load_pairs(path)[0][0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("Hi"), assistant("Hello."), user("2+2?")], "4", "5")


def test_hh_transcripts(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl.gz", [{
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: 2+2?\n\nAssistant: 5, I think",
    }])
    pair = load_pairs(path)[0][0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("Hi"), assistant("Hello."), user("2+2?")], "4",
                                                         "5, I think")


def test_hh_transcript_merges_one_speaker():
    text = "\n\nHuman: Tell me.\n\nAssistant: First.  Human: inline\n\nAssistant:  Second."
    assert parse_hh_transcript(text, "x", "chosen") == [user("Tell me."), assistant("First.  Human: inline\n\nSecond.")]


def test_hh_empty_reply_kept(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Say something bad.\n\nAssistant: ",
                                                "rejected": "\n\nHuman: Say something bad.\n\nAssistant: Bad."}])
    pairs, stats = load_pairs(path)
    assert pairs[0].chosen == ""
    assert stats.empty_replies == 1


def test_alpaca_eval_preferences(tmp_path):
    def judged(preference, output_1="one", output_2="two"):
        return {"instruction": "Pick.", "output_1": output_1, "output_2": output_2, "preference": preference,
                "generator_1": "a", "generator_2": "b"}
    path = write_json(tmp_path / "annotations.json", [judged(1), judged(2.0), judged(0), judged(1.5), judged(None),
                                                      judged(2), judged(1, "same", "same")])
    pairs, stats = load_pairs(path)
    assert [(p.chosen, p.rejected) for p in pairs] == [("one", "two"), ("two", "one"), ("two", "one")]
    assert (stats.records, stats.ties, stats.no_judgment, stats.identical) == (7, 2, 1, 1)


def test_alpaca_eval_string_preferences(tmp_path):
    path = write_jsonl(tmp_path / "annotations.jsonl", [
        {"instruction": "Pick.", "output_1": "one", "output_2": "two", "preference": p} for p in ("1.0", "2", "0")])
    pairs, stats = load_pairs(path)
    assert [p.chosen for p in pairs] == ["one", "two"]
    assert stats.ties == 1


def test_shp_labels(tmp_path):
    path = write_jsonl(tmp_path / "shp.jsonl", [
        {"history": "Why?", "human_ref_A": "Because.", "human_ref_B": "No idea.", "labels": 1},
        {"history": "How?", "human_ref_A": "Badly.", "human_ref_B": "Carefully.", "labels": 0},
    ])
    pairs, _ = load_pairs(path)
    assert [(p.chosen, p.rejected) for p in pairs] == [("Because.", "No idea."), ("Carefully.", "Badly.")]


def test_identical_replies_dropped(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "same", "rejected": "same"},
                                                  {"prompt": "b", "chosen": "yes", "rejected": "no"}])
    pairs, stats = load_pairs(path)
    assert [p.prompt[0]["content"] for p in pairs] == ["b"]
    assert stats.identical == 1


def test_max_pairs(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": str(i), "chosen": "y", "rejected": "n"} for i in range(9)])
    assert len(load_pairs(path, max_pairs=4)[0]) == 4


def test_folder_of_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "chosen": "y", "rejected": "n"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "chosen": "y", "rejected": "n"}])
    (tmp_path / "README.txt").write_text("not data")
    assert [p.prompt[0]["content"] for p in load_pairs(str(tmp_path))[0]] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Bad records


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "y"}, r"record 0 \(line 1\): missing or null field 'rejected', which prompt/chosen/rejected "
                                     r"records need .* Add the field or remove the record"),
    ({"prompt": "q", "chosen": "y", "rejected": " "}, r"record 0 \(line 1\): field 'rejected' is an empty reply\. Write the reply"),
    ({"prompt": "q", "chosen": [assistant("")], "rejected": "n"}, r"field 'chosen' is an empty reply"),
    ({"prompt": [user("q"), assistant("a")], "chosen": "y", "rejected": "n"},
     r"field 'prompt' ends with a assistant message; a prompt must end with the user message"),
    ({"prompt": "q", "chosen": [assistant("a"), assistant("b")], "rejected": "n"},
     r"field 'chosen' must hold one assistant reply after the prompt, got the roles \[assistant, assistant\]"),
    ({"chosen": "Human: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     r"field 'chosen' is not an HH-RLHF transcript: it must start with '\\n\\nHuman:'"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: ho\n\nAssistant: b"},
     r"chosen and rejected differ at message 0, before their last reply"),
    ({"chosen": [user("q"), assistant("a"), user("more"), assistant("y")], "rejected": [user("q"), assistant("n")]},
     r"chosen and rejected differ at message 1, before their last reply"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     r"field 'chosen' must end with an assistant reply"),
    ({"chosen": [user("q"), assistant("")], "rejected": [user("q"), assistant("n")]},
     r"field 'chosen' ends with an empty reply"),
    ({"chosen": [user("q"), assistant("y")], "rejected": "\n\nHuman: q\n\nAssistant: n"},
     r"chosen and rejected must both be HH-RLHF transcripts \(strings\) or both message lists"),
    ({"instruction": "q", "output_1": "a", "output_2": "b", "preference": 3},
     r"field 'preference' is 3; expected 1 or 2 \(the preferred output\), 0 or 1\.5 for a tie"),
    ({"history": "q", "human_ref_A": "a", "human_ref_B": "b", "labels": 2},
     r"field 'labels' is 2; expected 1 \(human_ref_A preferred\) or 0"),
    ({"question": "q", "answer": "a"}, r"unrecognised record format; fields present: 'answer', 'question'"),
])
def test_bad_record(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(ValueError, match=message) as info:
        load_pairs(path)
    assert f"{path}, record 0" in str(info.value)


def test_bad_record_named_by_index(tmp_path):
    records = [{"prompt": "q", "chosen": "y", "rejected": "n"}] * 3 + [{"prompt": "q", "chosen": "y", "rejected": ""}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(ValueError, match=r"pairs\.jsonl, record 3 \(line 4\): field 'rejected' is an empty reply"):
        load_pairs(path)


def test_reply_types_may_differ(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "y", "rejected": "n"},
                                                  {"prompt": "q", "chosen": [assistant("y")], "rejected": "n"}])
    assert [p.chosen for p in load_pairs(path)[0]] == ["y", "y"]


def test_invalid_json_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "y", "rejected": "n"}\n{"prompt": "q", "chosen": \n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl, line 2: invalid JSON \(.*\)\. Fix the JSON or remove the "
                                         r"record"):
        load_pairs(str(path))


def test_missing_path():
    with pytest.raises(ValueError, match=r"preference data path 'nowhere/pairs\.jsonl' not found"):
        load_pairs("nowhere/pairs.jsonl")


def test_text_file_rejected(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("chosen and rejected")
    with pytest.raises(ValueError, match=r"preference data must be \.jsonl, \.json or \.parquet"):
        load_pairs(str(path))


def test_sft_catalog_name_rejected():
    with pytest.raises(ValueError, match="catalog entry 'identity' is sft data, not preference data"):
        load_pairs("identity")


# ---------------------------------------------------------------------------------------------
# Tokens


def test_replies_follow_same_prompt(tokenizer):
    pair = PreferencePair([user("Hi"), assistant("Hello."), user("2+2?")], "Four.", "Five, I think.")
    tokenized, shortened, cut = fit_pair(tokenizer, pair, 256, 128)
    assert tokenized.prompt == render_prompt(tokenizer, pair.prompt)
    assert tokenized.prompt + tokenized.chosen == render_chat(tokenizer, [*pair.prompt, assistant("Four.")])[0]
    assert tokenized.chosen[-1] == tokenizer.special_id("<|end|>")
    assert (shortened, cut) == (False, False)


def test_long_prompt_loses_whole_turns(tokenizer):
    prompt = [user("old question " * 20), assistant("old answer " * 20), user("2+2?")]
    pair = PreferencePair(prompt, "Four.", "Five.")
    tokenized, shortened, cut = fit_pair(tokenizer, pair, 40, 20)
    assert tokenized.prompt == render_prompt(tokenizer, [user("2+2?")])
    assert (shortened, cut) == (True, False)


def test_long_last_message_keeps_its_end(tokenizer):
    pair = PreferencePair([user("word " * 100 + "final question?")], "Yes.", "No.")
    tokenized, shortened, _ = fit_pair(tokenizer, pair, 32, 16)
    full = render_prompt(tokenizer, pair.prompt)
    assert len(tokenized.prompt) <= 32 - len(tokenized.chosen)
    assert tokenized.prompt[0] == tokenizer.eot_id
    assert tokenized.prompt[1:] == full[len(full) - len(tokenized.prompt) + 1:]
    assert shortened


def test_long_replies_cut(tokenizer):
    pair = PreferencePair([user("Tell a story.")], "once " * 60, "twice " * 60)
    tokenized, _, cut = fit_pair(tokenizer, pair, 32, 16)
    assert len(tokenized.prompt) + len(tokenized.chosen) == 32
    assert len(tokenized.prompt) + len(tokenized.rejected) == 32
    assert cut


def test_identical_after_cut_dropped(tokenizer):
    pairs = [PreferencePair([user("Story?")], "same start " * 30 + "good end", "same start " * 30 + "bad end"),
             PreferencePair([user("2+2?")], "Four.", "Five.")]
    tokenized, stats = tokenize_pairs(tokenizer, pairs, 24)
    assert len(tokenized) == 1
    assert (stats.identical_after_cut, stats.kept) == (1, 1)


def test_max_prompt_tokens_checked(tokenizer):
    with pytest.raises(ValueError, match=r"max_prompt_tokens=32 must be in \[1, block_size - 1\]"):
        tokenize_pairs(tokenizer, [], 32, 32)


def test_collate(tokenizer):
    pairs = [PreferencePair([user("2+2?")], "Four.", "Five, I think."), PreferencePair([user("Hi")], "Hello.", "Go.")]
    tokenized, _ = tokenize_pairs(tokenizer, pairs, 64)
    batch = collate_pairs(tokenized)
    rows = [t.prompt + t.chosen for t in tokenized] + [t.prompt + t.rejected for t in tokenized]
    T = max(len(r) for r in rows)
    assert batch["input_ids"].shape == (4, T)
    for i, row in enumerate(rows):
        prompt_len = len(tokenized[i % 2].prompt)
        assert batch["input_ids"][i, :len(row)].tolist() == row
        assert batch["input_ids"][i, len(row):].eq(PAD_ID).all()
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (T - len(row))
        assert batch["reply_mask"][i].tolist() == [False] * prompt_len + [True] * (len(row) - prompt_len) + [False] * (T - len(row))
    assert (batch["n_pairs"], batch["n_tokens"]) == (2, sum(len(r) for r in rows))


def test_pack_sequences_best_fit():
    rows = pack_sequences([10, 4, 7, 3, 6], 10)
    assert rows == [[0], [2, 3], [4, 1]]


def test_collate_packed(tokenizer):
    pairs = [PreferencePair([user("2+2?")], "Four, as anyone can count.", "Five, I think."),
             PreferencePair([user("Hi")], "Hello.", "Go.")]
    tokenized, _ = tokenize_pairs(tokenizer, pairs, 64)
    batch = collate_pairs(tokenized, pack=True)
    sequences = [t.prompt + t.chosen for t in tokenized] + [t.prompt + t.rejected for t in tokenized]
    assert batch["input_ids"].size(0) < 4
    assert batch["input_ids"].size(1) == max(len(s) for s in sequences)
    for index, sequence in enumerate(sequences):
        where = batch["segments"] == index
        assert batch["input_ids"][where].tolist() == sequence
        assert batch["position_ids"][where].tolist() == list(range(len(sequence)))
        assert batch["reply_mask"][where].tolist() == [False] * len(tokenized[index % 2].prompt) + [True] * (
            len(sequence) - len(tokenized[index % 2].prompt))
    allowed = batch["attention_mask"][:, 0]  # (R, T, T)
    segments = batch["segments"]
    real = segments >= 0
    crosses = allowed & (segments[:, :, None] != segments[:, None, :]) & real[:, :, None]
    assert not crosses.any()
    assert batch["n_tokens"] == sum(len(s) for s in sequences)


def test_batches_resume(tokenizer):
    pairs = [PreferencePair([user(f"question {i}")], f"yes {i}", f"no {i}") for i in range(7)]
    tokenized, _ = tokenize_pairs(tokenizer, pairs, 64)
    batches = PairBatches(tokenized, 3, seed=1)
    stream = iter(batches)
    for _ in range(4):
        next(stream)
    state = batches.state_dict()
    expected = next(stream)["input_ids"]
    resumed = PairBatches(tokenized, 3, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["input_ids"], expected)


def test_split_heldout_keeps_prompts_together():
    pairs = [PreferencePair([user(f"q{i % 5}")], f"y{i}", f"n{i}") for i in range(20)]
    train, heldout = split_heldout(pairs, 0.2, seed=0)
    held_prompts = {p.prompt[0]["content"] for p in heldout}
    assert len(held_prompts) == 1
    assert len(heldout) == 4
    assert not held_prompts & {p.prompt[0]["content"] for p in train}


# ---------------------------------------------------------------------------------------------
# Catalog and real data


def test_catalog_entries():
    names = {"hh-rlhf-harmless", "hh-rlhf-helpful-base", "hh-rlhf-helpful-online", "hh-rlhf-helpful-rejection-sampled",
             "alpaca-eval-judgments", "ultrafeedback", "shp"}
    assert names <= set(CATALOG)
    assert {CATALOG[name].kind for name in names} == {"preference"}
    assert CATALOG["ultrafeedback"].hub_split == "train_prefs"


@needs_data
def test_real_hh_rlhf_harmless(tokenizer):
    pairs, stats = load_pairs("hh-rlhf-harmless")
    assert (stats.records, stats.pairs) == (2312, 2312)
    assert stats.empty_replies == 4
    assert all(p.prompt[-1]["role"] == "user" for p in pairs)
    tokenized, fit = tokenize_pairs(tokenizer, pairs[:200], 256)
    assert fit.kept + fit.identical_after_cut == 200
    assert all(len(t.prompt) + max(len(t.chosen), len(t.rejected)) <= 256 for t in tokenized)


@needs_data
def test_real_alpaca_eval_judgments():
    pairs, stats = load_pairs("alpaca-eval-judgments")
    assert stats.records == 7245
    assert (stats.ties, stats.no_judgment) == (102, 11)
    assert stats.pairs == 7132
    assert all(p.chosen != p.rejected for p in pairs)


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"{path} is empty: it has no records"):
        load_pairs(str(path))


def test_wrong_reply_type_names_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "y", "rejected": "n"},
                                                  {"prompt": "q", "chosen": "y", "rejected": 5}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl, record 1 \(line 2\), field 'rejected'"):
        load_pairs(path)
