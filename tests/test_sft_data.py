"""Tests for gpt/sft_data.py and the inspect-data stage: every record format from small files,
the real chat sets of the data kit, bad records, mixes, held-out splits, fitting to block_size
and the stage's output.

Tests marked needs_data read $GPTLAB_DATA_DIR and skip when it is unset.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt.catalog import DATA_DIR_ENV
from gpt.chat import render_chat, validate_messages
from gpt.checkpoint import save_model
from gpt.model import GPT, ModelConfig
from gpt.sft_data import (
    DEFAULT_NAMES,
    fit_conversations,
    fit_to_block,
    load_conversations,
    load_mix,
    parse_mix,
    split_heldout,
)
from gpt.tokenizer import Tokenizer
from finetune.inspect_data import InspectConfig, run
from gptlab.cli import main

DATA_DIR = os.environ.get(DATA_DIR_ENV)
needs_data = pytest.mark.skipif(not DATA_DIR, reason=f"{DATA_DIR_ENV} is not set; point it at the data kit")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, records: list) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def write_json(path: Path, content) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        json.dump(content, f)
    return path


def numbered(n: int, prefix: str) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "output": f"{prefix} answer {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer trained on this repository's chat code: enough merges for short text."""
    root = Path(__file__).resolve().parents[1]
    text = "".join((root / "gpt" / name).read_text() for name in ("chat.py", "chat_formats.py", "sft_data.py"))
    return Tokenizer.train([text[i:i + 500] for i in range(0, len(text), 500)], vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    tokenizer.save(folder / "tokenizer.json")
    return folder


# ---------------------------------------------------------------------------------------------
# Record formats


def test_alpaca_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate to English.", "input": "bonjour", "output": "hello"},
    ])
    assert load_conversations(str(path)) == [
        [user("Add 2 and 3."), assistant("5")],
        [user("Translate to English.\n\nbonjour"), assistant("hello")],
    ]


def test_alpaca_without_input(tmp_path):
    path = write_json(tmp_path / "alpaca.json", [{"instruction": "Say hi.", "output": "Hi!"}])
    assert load_conversations(str(path)) == [[user("Say hi."), assistant("Hi!")]]


def test_alpaca_system_field(tmp_path):
    path = write_json(tmp_path / "alpaca.json", [{"system": "Be brief.", "instruction": "Hi?", "output": "Hi."}])
    assert load_conversations(str(path)) == [[{"role": "system", "content": "Be brief."}, user("Hi?"), assistant("Hi.")]]


def test_gpteacher_json_gz(tmp_path):
    path = write_json(tmp_path / "gpteacher.json.gz", [
        {"instruction": "Write a loop.", "input": "language: C", "response": "for (;;) {}"},
    ])
    assert load_conversations(str(path)) == [[user("Write a loop.\n\nlanguage: C"), assistant("for (;;) {}")]]


def test_dolly_jsonl_gz(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl.gz", [
        {"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.", "response": "Shakespeare.",
         "category": "closed_qa"},
        {"instruction": "Name a fruit.", "context": "", "response": "Apple.", "category": "brainstorming"},
    ])
    assert load_conversations(str(path)) == [
        [user("Who wrote it?\n\nHamlet is a play by Shakespeare."), assistant("Shakespeare.")],
        [user("Name a fruit."), assistant("Apple.")],
    ]


def test_sharegpt_json(tmp_path):
    path = write_json(tmp_path / "sharegpt.json", [{"conversations": [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "user", "value": "Bye"},
        {"from": "chatgpt", "value": "Goodbye!"},
        {"from": "human", "value": "unanswered"},
    ]}])
    assert load_conversations(str(path)) == [[
        {"role": "system", "content": "Be kind."}, user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye!"),
    ]]


def test_openai_parquet(tmp_path):
    path = tmp_path / "openai.parquet"
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "source": "a"},
        {"messages": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hi."}], "source": "b"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_conversations(str(path)) == [
        [user("2+2?"), assistant("4")],
        [{"role": "system", "content": "Terse."}, user("Hi"), assistant("Hi.")],
    ]


def test_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Capital of Italy?", "completion": "Rome."},
        {"prompt": "Capital of Spain?", "completion": "Madrid."},
    ])
    assert load_conversations(str(path))[1] == [user("Capital of Spain?"), assistant("Madrid.")]


def test_prompt_response(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    assert load_conversations(str(path)) == [[user("Hi"), assistant("Hello")]]


def test_question_answer(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "1+1 = 2\n#### 2"}])
    assert load_conversations(str(path)) == [[user("1+1?"), assistant("1+1 = 2\n#### 2")]]


def test_self_instruct_instances(tmp_path):
    path = write_jsonl(tmp_path / "seed.jsonl", [{
        "id": "seed_task_0", "instruction": "Reverse the word.",
        "instances": [{"input": "abc", "output": "cba"}, {"input": "", "output": "Give me a word."}],
    }])
    assert load_conversations(str(path)) == [
        [user("Reverse the word.\n\nabc"), assistant("cba")],
        [user("Reverse the word."), assistant("Give me a word.")],
    ]


def test_taskmaster_utterances(tmp_path):
    path = write_json(tmp_path / "tm.json", [{"conversation_id": "dlg-1", "utterances": [
        {"index": 0, "speaker": "USER", "text": "A latte, please."},
        {"index": 1, "speaker": "USER", "text": "Large."},
        {"index": 2, "speaker": "ASSISTANT", "text": "One large latte."},
        {"index": 3, "speaker": "user", "text": "Thanks."},
    ]}, {"conversation_id": "dlg-2", "utterances": [{"index": 0, "speaker": "USER", "text": "Hello?"}]}])
    assert load_conversations(str(path)) == [[user("A latte, please.\nLarge."), assistant("One large latte.")]]


def test_chitchat_keyed_by_id(tmp_path):
    def message(text, sender):
        return {"text": text, "sender": sender, "timestamp": "2018-05-02T19:38:15Z"}

    path = write_json(tmp_path / "chitchat.json", {
        "id-1": {"messages": [
            [message("Hello", "A"), message("How are you?", "A")],
            [message("Good", "B")],
            [message("", "B"), message("and you?", "B")],
            [message("Fine.", "A")],
        ], "prompt": "Say hi"},
        "id-2": {"messages": [[message("anyone there?", "A")]], "prompt": "Say hi"},
    })
    assert load_conversations(str(path)) == [
        [user("Hello\nHow are you?"), assistant("Good\nand you?")],
    ]


OASST = [
    {"message_id": "r1", "parent_id": None, "role": "prompter", "text": "Tell me a joke.", "rank": None, "lang": "en"},
    {"message_id": "a1", "parent_id": "r1", "role": "assistant", "text": "Second-best joke.", "rank": 1},
    {"message_id": "a2", "parent_id": "r1", "role": "assistant", "text": "Best joke.", "rank": 0},
    {"message_id": "p2", "parent_id": "a2", "role": "prompter", "text": "Another?", "rank": None},
    {"message_id": "a3", "parent_id": "p2", "role": "assistant", "text": "Deleted joke.", "rank": 0, "deleted": True},
    {"message_id": "a4", "parent_id": "p2", "role": "assistant", "text": "Unranked joke.", "rank": None},
    {"message_id": "r2", "parent_id": None, "role": "prompter", "text": "Unanswered tree.", "rank": None},
    {"message_id": "r3", "parent_id": None, "role": "prompter", "text": "Hi", "rank": None},
    {"message_id": "a5", "parent_id": "r3", "role": "assistant", "text": "Hello.", "rank": None},
    {"message_id": "p3", "parent_id": "a5", "role": "prompter", "text": "Trailing prompt", "rank": None},
]


def test_oasst_best_path(tmp_path):
    path = write_jsonl(tmp_path / "oasst.jsonl", OASST)
    assert load_conversations(str(path)) == [
        [user("Tell me a joke."), assistant("Best joke."), user("Another?"), assistant("Unranked joke.")],
        [user("Hi"), assistant("Hello.")],
    ]


def test_oasst_repeated_id(tmp_path):
    path = write_jsonl(tmp_path / "oasst.jsonl", [
        {"message_id": "x", "parent_id": None, "role": "prompter", "text": "Q"},
        {"message_id": "y", "parent_id": "x", "role": "assistant", "text": "A"},
        {"message_id": "y", "parent_id": "y", "role": "assistant", "text": "loop"},
    ])
    assert load_conversations(str(path)) == [[user("Q"), assistant("A")]]


def test_hub_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"instruction": "Hi", "input": "", "output": "Hello"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_conversations("someone/chat-set", split="test") == [[user("Hi"), assistant("Hello")]]
    assert calls == [("someone/chat-set", None, "test")]


def test_hub_catalog_entry(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"messages": [user("Hi"), assistant("Hello")], "source": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_conversations("smoltalk", split="ignored") == [[user("Hi"), assistant("Hello")]]
    assert calls == [("HuggingFaceTB/smoltalk", "all", "train")]


def test_hub_record_error_names_dataset(monkeypatch):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None: datasets.Dataset.from_list(rows))
    with pytest.raises(ValueError, match=r"someone/chat-set split train, record 1: missing field 'output'"):
        load_conversations("someone/chat-set")


@pytest.mark.parametrize("source, pattern", [
    ("someone/missing", r"'someone/missing' is neither a chat catalog name nor a local file or folder, and loading "
                        r"it from the Hugging Face Hub failed: no network"),
    ("alpaca", r"catalog entry 'alpaca': loading 'tatsu-lab/alpaca' from the Hugging Face Hub failed: no network\. "
               r"Connect to the internet"),
])
def test_hub_unreachable(monkeypatch, source, pattern):
    def unreachable(name, config=None, split=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ValueError, match=pattern):
        load_conversations(source)


def test_folder_reads_every_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", numbered(2, "a"))
    write_json(tmp_path / "b.json", [{"messages": [user("b?"), assistant("b.")]}])
    (tmp_path / "LICENSE").write_text("MIT")
    conversations = load_conversations(str(tmp_path))
    assert [c[0]["content"] for c in conversations] == ["a question 0", "a question 1", "b?"]


def test_glob_and_max_examples(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", numbered(3, "a"))
    write_jsonl(tmp_path / "b.jsonl", numbered(3, "b"))
    conversations = load_conversations(str(tmp_path / "*.jsonl"), max_examples=4)
    assert [c[0]["content"] for c in conversations] == ["a question 0", "a question 1", "a question 2", "b question 0"]


def test_placeholders_only_when_named(tmp_path):
    path = write_json(tmp_path / "me.json", [{"instruction": "Who?", "output": "I am {{name}} by {{author}}."}])
    assert load_conversations(str(path))[0][1]["content"] == "I am {{name}} by {{author}}."
    filled = load_conversations(str(path), names={"name": "Ada", "author": "Lovelace Labs"})
    assert filled[0][1]["content"] == "I am Ada by Lovelace Labs."


# ---------------------------------------------------------------------------------------------
# Bad records


def test_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "a", "output": "b"},
        {"instruction": "c", "input": "d"},
    ])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, record 1 \(line 2\): missing field 'output', "
                                         r"which alpaca records need \(fields found: 'instruction', 'input'\)"):
        load_conversations(str(path))


def test_unknown_role(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"},
    ]}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, record 0, conversations\[1\]: unknown role "
                                         r"'robot' in field 'from'; expected one of system, human"):
        load_conversations(str(path))


def test_unknown_openai_role(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("hi"), {"role": "tool", "content": "{}"}]}])
    with pytest.raises(ValueError, match=r"record 0 \(line 1\), messages\[1\]: unknown role 'tool' in field 'role'"):
        load_conversations(str(path))


def test_empty_conversation(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("q"), assistant("a")]}, {"messages": []}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, record 1 \(line 2\): empty conversation"):
        load_conversations(str(path))


def test_no_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("q"), user("still q")]}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, record 0 \(line 1\): conversation has no "
                                         r"assistant turn \(roles: user, user\)"):
        load_conversations(str(path))


def test_unrecognised_format(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, record 0 \(line 1\): unrecognised record format; "
                                         r"fields found: 'foo', 'bar'\. Known formats: alpaca"):
        load_conversations(str(path))


def test_system_not_first(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [user("q"), {"role": "system", "content": "s"},
                                                              assistant("a")]}])
    with pytest.raises(ValueError, match=r"record 0 \(line 1\), message 1: a system message may only come first"):
        load_conversations(str(path))


def test_missing_field_after_first(tmp_path):
    path = write_jsonl(tmp_path / "seed.jsonl", [
        {"instruction": "a", "instances": [{"input": "", "output": "b"}]},
        {"instruction": "c"},
    ])
    with pytest.raises(ValueError, match=r"record 1 \(line 2\): missing field 'instances', which self-instruct"):
        load_conversations(str(path))


def test_non_string_field(tmp_path):
    path = write_json(tmp_path / "bad.json", [{"instruction": "q", "output": 42}])
    with pytest.raises(ValueError, match=r"bad.json, record 0: field 'output' must be a string, got int"):
        load_conversations(str(path))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}, line 2: invalid JSON"):
        load_conversations(str(path))


def test_text_file_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: chat data must be .json.*plain text has no roles"):
        load_conversations(str(path))


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"chat data path '.*nope.jsonl' not found"):
        load_conversations(str(tmp_path / "nope.jsonl"))


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no records"):
        load_conversations(str(path))


def test_pretrain_catalog_rejected():
    with pytest.raises(ValueError, match=r"catalog entry 'tinystories' is pretrain data, not chat data"):
        load_conversations("tinystories")


def test_local_only_set_without_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=rf"'chitchat' exists only as local files .* Set {DATA_DIR_ENV}"):
        load_conversations("chitchat")


def test_catalog_files_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=r"'identity': .* has no file matching sft/identity/identity.json"):
        load_conversations("identity")


# ---------------------------------------------------------------------------------------------
# The real chat sets


REAL_SETS = {
    # name: conversations expected: the record counts of the data kit README, except for chitchat
    "gpteacher": 14_131,
    "gpteacher-codegen": 4_535,
    "taskmaster4": 3_710,
    "identity": 91,
    "self-instruct-seed": 175,
    "gsm8k-train": 7_473,
    # 7,168 conversations, of which 3,151 have text from one sender only and so no reply.
    "chitchat": 4_017,
}


@pytest.fixture(scope="module")
def real_sets() -> dict[str, list]:
    return {name: load_conversations(name) for name in REAL_SETS}


@needs_data
@pytest.mark.parametrize("name", REAL_SETS)
def test_real_set_count(real_sets, name):
    assert len(real_sets[name]) == REAL_SETS[name]


@needs_data
@pytest.mark.parametrize("name", REAL_SETS)
def test_real_set_valid(real_sets, name):
    for index, conversation in enumerate(real_sets[name]):
        assert validate_messages(conversation, f"{name} {index}") == conversation
        assert conversation[-1]["role"] == "assistant", f"{name} {index}"
        assert conversation[0]["role"] == "user", f"{name} {index}"


@needs_data
@pytest.mark.parametrize("name", ["chitchat", "taskmaster4"])
def test_real_dialogs_alternate(real_sets, name):
    for index, conversation in enumerate(real_sets[name]):
        roles = [m["role"] for m in conversation]
        assert roles == ["user", "assistant"] * (len(roles) // 2), f"{name} {index}"


@needs_data
def test_real_multi_turn(real_sets):
    turns = Counter(len(c) for c in real_sets["chitchat"])
    assert max(turns) > 20


@needs_data
def test_gsm8k_keeps_answer_line(real_sets):
    for conversation in real_sets["gsm8k-train"]:
        assert re.search(r"\n#### -?[\d,.]+$", conversation[-1]["content"]), conversation[-1]["content"][-80:]


@needs_data
def test_identity_filled(real_sets):
    text = "".join(m["content"] for c in real_sets["identity"] for m in c)
    assert "{{" not in text
    assert DEFAULT_NAMES["name"] in text
    assert DEFAULT_NAMES["author"] in text


@needs_data
def test_identity_custom_names():
    conversations = load_conversations("identity", names={"name": "Ada"})
    text = "".join(m["content"] for c in conversations for m in c)
    assert "Ada" in text
    assert DEFAULT_NAMES["author"] in text
    assert "{{" not in text


@needs_data
def test_identity_path_keeps_placeholders():
    conversations = load_conversations(os.path.join(DATA_DIR, "sft/identity/identity.json"))
    assert "{{name}}" in conversations[2][1]["content"]


@needs_data
def test_other_sets_not_filled(tmp_path):
    conversations = load_conversations("gpteacher-codegen", max_examples=5, names={"name": "Ada"})
    assert conversations == load_conversations("gpteacher-codegen", max_examples=5)


# ---------------------------------------------------------------------------------------------
# Mixes and held-out splits


def test_parse_mix():
    assert parse_mix("gpteacher:0.5, chitchat:0.3,identity:1") == [
        ("gpteacher", 0.5), ("chitchat", 0.3), ("identity", 1.0),
    ]


def test_parse_mix_default_weight():
    assert parse_mix("gpteacher,identity:3") == [("gpteacher", 1.0), ("identity", 3.0)]


def test_parse_mix_paths_with_colons():
    assert parse_mix(r"C:\data\chat.jsonl,hf://datasets/x") == [(r"C:\data\chat.jsonl", 1.0), ("hf://datasets/x", 1.0)]


@pytest.mark.parametrize("spec, pattern", [
    ("gpteacher:0", r"weight 0.0 must be a positive number"),
    ("gpteacher:-1", r"weight -1.0 must be a positive number"),
    ("gpteacher:nan", r"weight nan must be a positive number"),
    ("gpteacher:half", r"weight 'half' is not a number"),
    ("gpteacher,,identity", r"has an empty entry"),
    ("", r"has an empty entry"),
    ("identity:1,identity:2", r"lists 'identity' twice"),
])
def test_parse_mix_rejects(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_mix(spec)


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, str]:
    a = write_jsonl(tmp_path / "a.jsonl", numbered(10, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", numbered(20, "b"))
    return str(a), str(b)


def source_counts(conversations: list) -> Counter:
    return Counter(c[0]["content"].split()[0] for c in conversations)


def test_mix_weights(two_sources):
    a, b = two_sources
    conversations = load_mix(f"{a}:0.5,{b}:2.5", seed=0)
    assert source_counts(conversations) == {"a": 5, "b": 50}


def test_mix_repeats_whole_copies(two_sources):
    _, b = two_sources
    copies = Counter(c[0]["content"] for c in load_mix(f"{b}:2.5", seed=0))
    assert sorted(Counter(copies.values()).items()) == [(2, 10), (3, 10)]


def test_mix_deterministic(two_sources):
    a, b = two_sources
    spec = f"{a}:0.3,{b}:0.5"
    assert load_mix(spec, seed=1) == load_mix(spec, seed=1)
    assert load_mix(spec, seed=1) != load_mix(spec, seed=2)


def test_mix_draw_independent_of_others(two_sources):
    a, b = two_sources
    alone = load_mix(f"{b}:0.5", seed=3)
    mixed = load_mix(f"{a}:1,{b}:0.5", seed=3)
    assert mixed[10:] == alone


def test_mix_single_source_is_plain_load(two_sources):
    a, _ = two_sources
    assert load_mix(a) == load_conversations(a)


def test_heldout_split(two_sources):
    a, _ = two_sources
    conversations = load_conversations(a)
    train, heldout = split_heldout(conversations, 0.2, seed=0)
    assert len(heldout) == 2
    assert len(train) == 8
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in heldout}
    assert split_heldout(conversations, 0.2, seed=0) == (train, heldout)
    assert split_heldout(conversations, 0.2, seed=1) != (train, heldout)


def test_heldout_keeps_copies_together(two_sources):
    _, b = two_sources
    conversations = load_mix(f"{b}:3", seed=0)
    train, heldout = split_heldout(conversations, 0.25, seed=0)
    held = {c[0]["content"] for c in heldout}
    assert len(heldout) == 5
    assert len(train) == 45
    assert not held & {c[0]["content"] for c in train}


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_heldout_fraction_range(fraction):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        split_heldout([[user("q"), assistant("a")]], fraction, seed=0)


# ---------------------------------------------------------------------------------------------
# Fitting to block_size


LONG_CHAT = [
    {"role": "system", "content": "You answer questions."},
    user("First question about the chat template?"),
    assistant("The first answer, of moderate length."),
    user("A second question follows here."),
    assistant("The second answer is a little longer than the first answer was."),
    user("Third?"),
    assistant("Third answer."),
]


def test_fit_whole(tokenizer):
    ids, mask = render_chat(tokenizer, LONG_CHAT)
    assert fit_to_block(tokenizer, LONG_CHAT, len(ids)) == (ids, mask)


def test_fit_truncates_at_turn(tokenizer):
    full = len(render_chat(tokenizer, LONG_CHAT)[0])
    two_exchanges = render_chat(tokenizer, LONG_CHAT[:5])
    for block_size in (len(two_exchanges[0]), full - 1):
        assert fit_to_block(tokenizer, LONG_CHAT, block_size) == two_exchanges, f"block_size {block_size}"


def test_fit_keeps_first_exchange(tokenizer):
    first = render_chat(tokenizer, LONG_CHAT[:3])
    second = render_chat(tokenizer, LONG_CHAT[:5])
    fitted = fit_to_block(tokenizer, LONG_CHAT, len(second[0]) - 1)
    assert fitted == first
    assert fitted[1][-1] == 1
    assert fitted[0][-1] == tokenizer.special_id("<|end|>")


def test_fit_drops(tokenizer):
    first = render_chat(tokenizer, LONG_CHAT[:3])
    assert fit_to_block(tokenizer, LONG_CHAT, len(first[0]) - 1) is None


def test_fit_counts(tokenizer):
    short = [user("hi"), assistant("hello")]
    first = len(render_chat(tokenizer, LONG_CHAT[:3])[0])
    result = fit_conversations(tokenizer, [short, LONG_CHAT, short, [user("x" * 500), assistant("y")]], first)
    assert result.kept == [0, 1, 2]
    assert result.truncated == 1
    assert result.dropped == 1
    assert result.lengths[1] == len(render_chat(tokenizer, LONG_CHAT)[0])
    assert all(len(ids) <= first for ids, _ in result.examples)


# ---------------------------------------------------------------------------------------------
# The inspect-data stage


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [user("What is 2+2?"), assistant("It is 4.")]},
        {"messages": [user("Name a color."), assistant("Blue."), user("Another?"), assistant("Red.")]},
        {"messages": [user("long " * 200), assistant("ok")]},
    ])


def test_inspect_plain(capsys, chat_file, tokenizer_dir):
    status = main(["inspect-data", f"data={chat_file}", f"tokenizer={tokenizer_dir}", "num_examples=3",
                   "block_size=128", "color=false"])
    out = capsys.readouterr().out
    assert status == 0
    assert "<|user|>What is 2+2?<|end|>\n<|assistant|>«It is 4.<|end|>»\n" in out
    assert "<|user|>Name a color.<|end|>\n<|assistant|>«Blue.<|end|>»\n<|user|>Another?<|end|>" in out
    assert "dropped: " in out
    assert re.search(r"conversations +3 \(2 kept\)", out)
    assert re.search(r"turns +8 \(4 by the assistant\)", out)
    assert re.search(r"dropped +1 \(33\.3%\)", out)
    assert "\x1b[" not in out


def test_inspect_counts(chat_file, tokenizer_dir, tokenizer):
    counts = run(InspectConfig(data=str(chat_file), tokenizer=str(tokenizer_dir), block_size=1024, num_examples=0,
                               color=False))
    rendered = [render_chat(tokenizer, c) for c in load_conversations(str(chat_file))]
    assert counts["conversations"] == 3
    assert counts["dropped"] == 0
    assert counts["tokens"] == sum(len(ids) for ids, _ in rendered)
    assert counts["trained_tokens"] == sum(sum(mask) for _, mask in rendered)
    assert counts["max_tokens"] == max(len(ids) for ids, _ in rendered)


def test_inspect_color(capsys, chat_file, tokenizer_dir):
    assert main(["inspect-data", f"data={chat_file}", f"tokenizer={tokenizer_dir}", "num_examples=3",
                 "block_size=128", "--color"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[32m" in out
    assert "«" not in out


def test_inspect_missing_tokenizer(capsys, chat_file, tmp_path):
    assert main(["inspect-data", f"data={chat_file}", f"tokenizer={tmp_path / 'none'}"]) == 2
    assert "tokenizer file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint_dir(tokenizer, tokenizer_dir, tmp_path_factory) -> Path:
    """A checkpoint folder (model.json, weights, tokenizer.json) whose model has block_size 64."""
    folder = tmp_path_factory.mktemp("checkpoint")
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=32, block_size=64))
    save_model(model, folder, tokenizer_file=tokenizer_dir / "tokenizer.json", step=0)
    return folder


def test_inspect_checkpoint_block_size(capsys, chat_file, checkpoint_dir, tokenizer):
    counts = run(InspectConfig(data=str(chat_file), tokenizer=str(checkpoint_dir), num_examples=0, color=False))
    fit = fit_conversations(tokenizer, load_conversations(str(chat_file)), 64)
    out = capsys.readouterr().out
    assert counts["block_size"] == 64
    assert counts["kept"] == len(fit.examples)
    assert counts["dropped"] == fit.dropped
    assert f"block_size: 64 (the checkpoint's, from {checkpoint_dir / 'model.json'})" in out


def test_inspect_block_size_below_checkpoint(chat_file, checkpoint_dir):
    counts = run(InspectConfig(data=str(chat_file), tokenizer=str(checkpoint_dir / "tokenizer.json"), block_size=32,
                               num_examples=0, color=False))
    assert counts["block_size"] == 32


def test_inspect_block_size_above_checkpoint(capsys, chat_file, checkpoint_dir):
    assert main(["inspect-data", f"data={chat_file}", f"tokenizer={checkpoint_dir}", "block_size=65"]) == 2
    err = capsys.readouterr().err
    assert "block_size 65 is larger than the checkpoint's block_size 64" in err
    assert "use block_size=64 or less, or 0 for the checkpoint's" in err


def test_inspect_block_size_needs_checkpoint(capsys, chat_file, tokenizer_dir):
    assert main(["inspect-data", f"data={chat_file}", f"tokenizer={tokenizer_dir}"]) == 2
    err = capsys.readouterr().err
    assert f"block_size=0 takes the block_size of a checkpoint, but {tokenizer_dir} has no model.json" in err


def test_inspect_bad_config(capsys, chat_file):
    assert main(["inspect-data", f"data={chat_file}", "block_size=-1", "num_examples=-1"]) == 2
    err = capsys.readouterr().err
    assert "block_size must be 0 (the checkpoint's) or a positive number of tokens, got -1" in err
    assert "num_examples must be 0 or more, got -1" in err


@needs_data
def test_inspect_real_mix(capsys, tokenizer_dir):
    assert main(["inspect-data", "data=identity:0.5,taskmaster4", f"tokenizer={tokenizer_dir}", "max_examples=40",
                 "num_examples=2", "color=false", "name=Ada", "block_size=512"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"conversations +60 ", out)


def test_openai_record_without_messages_names_messages(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"conversation": [{"role": "user", "content": "c"}]},
    ])
    with pytest.raises(ValueError, match=r"record 1 \(line 2\): missing field 'messages', which openai records need"):
        load_conversations(str(path))
