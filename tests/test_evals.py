"""The eval stage end to end: task loaders on the real data kit, the metrics against
hand-worked numbers, results.json and replies.jsonl, and `gptlab eval` on a tiny checkpoint."""

import gzip
import json
import math
import os
from pathlib import Path

import pytest
import torch

from evals import tasks
from evals.harness import EvalConfig, format_table
from evals.metrics import Accuracy, BitsPerByte, NumberExactMatch, WinRate, extract_number
from evals.scoring import load_reward_scorer
from gpt.checkpoint import save_model
from gpt.model import GPT, ModelConfig
from gpt.shards import token_dtype, write_meta, write_shards
from gpt.tokenizer import Tokenizer
from gptlab.cli import main

DATA_DIR = os.environ.get("GPTLAB_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR, reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

HELLASWAG_RECORDS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then", "ctx": "",
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men "
                 "supporting the head of the person wearing winter clothes snow as the we girls sled.",
                 ", the man puts on a christmas coat, knitted with netting.",
                 ", the man continues removing the snow on his car."],
     "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "train", "split_type": "indomain", "label": "3"},
    {"ind": 9, "activity_label": "Health", "ctx_a": "[header] How to cope with suicidal thoughts [title] Talk to "
     "someone.", "ctx_b": "", "ctx": "",
     "endings": ["[step] Find a friend [title] Call them.", "Ask for help.", "Go outside.", "Write it down."],
     "source_id": "wikihow~1", "split": "val", "split_type": "zeroshot", "label": "1"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT saved with a tokenizer trained on a slice of TinyStories."""
    if not DATA_DIR:
        pytest.skip("GPTLAB_DATA_DIR is not set")
    folder = tmp_path_factory.mktemp("ckpt")
    text = gzip.open(Path(DATA_DIR) / "pretrain/tinystories/tinystories_train_prefix.txt.gz", "rt").read()[:60_000]
    tokenizer = Tokenizer.train(text.split("\n\n"), vocab_size=400)
    tokenizer.save(folder / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_layout("gpt2", vocab_size=400, n_layer=2, n_head=2, n_embd=32, block_size=64))
    save_model(model, folder / "model", tokenizer_file=folder / "tokenizer.json")
    return folder / "model"


@pytest.fixture
def hellaswag_file(tmp_path) -> Path:
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_RECORDS), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Task loaders on the real files


@needs_data
def test_arc_loader():
    examples = tasks.multiple_choice_examples("arc_easy", "arc-easy", "arc-easy-dev", 0, 3, seed=1)
    assert len(examples) == 3
    first = examples[0]
    assert first.context == ("Question: Which statement best explains why photosynthesis is the foundation of most "
                             "food webs?\nAnswer:")
    assert first.choices[first.gold] == "Sunlight is the source of energy for nearly all ecosystems."
    assert first.continuations()[0] == " Sunlight is the source of energy for nearly all ecosystems."


@needs_data
def test_arc_numeric_answer_keys():
    examples = tasks.multiple_choice_examples("arc_challenge", "arc-challenge", None, 0, None, seed=1)
    assert len(examples) == 1170
    assert all(0 <= e.gold < len(e.choices) for e in examples)
    assert {len(e.choices) for e in examples} == {3, 4, 5}


@needs_data
def test_arc_fewshot_from_dev():
    dev_questions = {r["question"]["stem"] for r in tasks.load_records("arc-easy-dev")}
    (example,) = tasks.multiple_choice_examples("arc_easy", "arc-easy", "arc-easy-dev", 2, 1, seed=1)
    shots = example.context.split("\n\n")
    assert len(shots) == 3
    assert all(shot.removeprefix("Question: ").split("\nAnswer:")[0] in dev_questions for shot in shots[:2])


@needs_data
def test_mmlu_loader_five_shot():
    examples = tasks.multiple_choice_examples("mmlu", "mmlu", "mmlu-dev", 5, 3, seed=1)
    assert [e.group for e in examples] == ["abstract_algebra", "anatomy", "astronomy"]
    first = examples[0]
    assert first.context.startswith("The following are multiple choice questions (with answers) about abstract "
                                    "algebra.\n\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n")
    assert first.context.count("\nAnswer:") == 6
    assert first.context.endswith("over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert first.choices == ["A", "B", "C", "D"]
    assert first.gold == 1


@needs_data
def test_lambada_loader():
    pairs = tasks.lambada_examples("lambada", 2)
    assert pairs[0][0].endswith("I don't care about")
    assert pairs[0][1] == " signs"
    assert pairs[1][1] == " Shane"


@needs_data
def test_blimp_loader_spreads_paradigms():
    examples = tasks.multiple_choice_examples("blimp", "blimp", None, 0, 3, seed=1)
    assert [e.group for e in examples] == ["adjunct_island", "anaphor_gender_agreement", "anaphor_number_agreement"]
    assert examples[1].choices == ["Katherine can't help herself.", "Katherine can't help himself."]
    assert all(e.gold == 0 and e.context == "" and e.delimiter == "" for e in examples)


@needs_data
def test_gsm8k_loader():
    (example,) = tasks.gsm8k_examples("gsm8k", "gsm8k-train", 5, 1, seed=1)
    assert example.prompt.count("Question:") == 6
    assert example.prompt.count("####") == 5
    assert example.prompt.endswith("How much in dollars does she make every day at the farmers' market?\nAnswer:")
    assert extract_number(example.reference) == "18"


@needs_data
def test_chat_prompt_loaders():
    mt_bench = tasks.chat_prompts("mt-bench", 2)
    assert mt_bench[0].id == "81"
    assert len(mt_bench[0].turns) == 2
    alpaca = tasks.chat_prompts("alpaca-eval", None)
    assert len(alpaca) == 805
    assert len(tasks.chat_prompts("vicuna-bench", None)) == 80


def test_hellaswag_preprocessing(hellaswag_file):
    examples = tasks.multiple_choice_examples("hellaswag", str(hellaswag_file), None, 0, None, seed=1)
    assert examples[0].context == ("Removing ice from car: Then, the man writes over the snow covering the window of "
                                   "a car, and a woman wearing winter clothes smiles. Then")
    assert examples[0].gold == 3
    assert examples[0].choices[3] == ", the man continues removing the snow on his car."
    # "[title]" becomes ". ", other bracketed markers go, and an empty ctx_b leaves no trailing space.
    assert examples[1].context == "Health: How to cope with suicidal thoughts. Talk to someone."
    # The text is stripped before the markers go, so a leading marker leaves a space, as in lm-evaluation-harness.
    assert examples[1].choices[0] == " Find a friend. Call them."


def test_hellaswag_fewshot_from_file(hellaswag_file):
    examples = tasks.multiple_choice_examples("hellaswag", str(hellaswag_file), str(hellaswag_file), 1, 1, seed=3)
    shot, question = examples[0].context.split("\n\n")
    assert question.startswith("Removing ice from car: ")
    assert shot in ("Removing ice from car: Then, the man writes over the snow covering the window of a car, and a "
                    "woman wearing winter clothes smiles. Then , the man continues removing the snow on his car.",
                    "Health: How to cope with suicidal thoughts. Talk to someone. Ask for help.")


def test_fewshot_never_uses_own_example():
    examples = [tasks.MultipleChoiceExample(f"Q{i}:", [f"a{i}", "b"], 0) for i in range(3)]
    tasks.add_fewshot(examples, None, 2, seed=0)
    for i, example in enumerate(examples):
        assert example.context.endswith(f"Q{i}:")
        assert example.context.count(f"Q{i}:") == 1
        assert example.context.count("\n\n") == 2


def test_missing_field_message(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "Why?"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"arc.jsonl, record 0: missing field 'choices'"):
        tasks.multiple_choice_examples("arc_easy", str(path), None, 0, None, seed=1)


def test_unknown_source():
    with pytest.raises(ValueError, match="not found"):
        tasks.load_records("./no/such/file.jsonl")


# ---------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("text, strict, expected", [
    ("She makes 9 * 2 = $18.\n#### 18", False, "18"),
    ("#### 1,234", True, "1234"),
    ("The answer is 42.", False, "42"),
    ("The answer is 42.", True, None),
    ("It costs $18.00 in all", False, "18"),
    ("#### -3.50", False, "-3.5"),
    ("no number here", False, None),
])
def test_extract_number(text, strict, expected):
    assert extract_number(text, strict=strict) == expected


def test_accuracy_metric_stderr():
    result = Accuracy(keep_in_memory=True).compute(predictions=[1, 0, 2, 3], references=[1, 1, 2, 3])
    assert result["accuracy"] == 0.75
    # Values 1, 0, 1, 1: sample variance 0.25, so stderr = 0.5 / sqrt(4).
    assert result["stderr"] == pytest.approx(0.25)


def test_number_exact_match_metric():
    metric = NumberExactMatch(keep_in_memory=True)
    predictions = ["so 18 eggs.\n#### 18", "The answer is 18", "#### 17"]
    references = ["... #### 18"] * 3
    assert metric.compute(predictions=predictions, references=references)["exact_match"] == pytest.approx(2 / 3)
    assert metric.compute(predictions=predictions, references=references, strict=True)["exact_match"] == \
        pytest.approx(1 / 3)


def test_bits_per_byte_metric():
    result = BitsPerByte(keep_in_memory=True).compute(nll=[8 * math.log(2), 4 * math.log(2)], n_tokens=[3, 3],
                                                      n_bytes=[4, 2])
    assert result["bits_per_byte"] == pytest.approx(2.0)
    assert result["loss"] == pytest.approx(12 * math.log(2) / 6)
    assert result["perplexity"] == pytest.approx(4.0)


def test_win_rate_metric():
    result = WinRate(keep_in_memory=True).compute(predictions=[3.0, 1.0, 2.0, 2.0], references=[1.0, 2.0, 2.0, 0.0])
    assert result["win_rate"] == 0.625  # outcomes 1, 0, 0.5, 1
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert 0.0 <= result["ci_low"] <= 0.625 <= result["ci_high"] <= 1.0


def test_format_table_shows_chance():
    table = format_table([{"task": "arc_easy", "metric": "acc", "value": 0.3, "stderr": 0.05, "chance": 0.25,
                           "n": 100, "seconds": 1.5}])
    header, _, line = table.splitlines()
    assert header.split() == ["task", "metric", "value", "±", "stderr", "chance", "n", "seconds"]
    assert line.split() == ["arc_easy", "acc", "0.3000", "0.0500", "0.2500", "100", "1.5"]


# ---------------------------------------------------------------------------------------------
# The stage


@needs_data
def test_eval_stage_end_to_end(checkpoint, hellaswag_file, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(checkpoint), "--tasks",
                 "lm,arc_easy,mmlu,blimp,lambada,hellaswag,gsm8k,vicuna_bench", "--limit", "2",
                 "--max_new_tokens", "8", "--out_dir", str(out), "--sources", f"{{hellaswag: {hellaswag_file}}}"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] == str(checkpoint)
    assert results["config"]["limit"] == 2
    rows = results["results"]
    assert {r["task"] for r in rows} == {"lm", "arc_easy", "mmlu", "blimp", "lambada", "hellaswag", "gsm8k",
                                         "vicuna_bench"}
    for r in rows:
        assert {"task", "metric", "value", "stderr", "n", "seconds"} <= set(r)
        assert r["n"] == 2
    by_key = {(r["task"], r["metric"]): r for r in rows}
    assert by_key["arc_easy", "acc"]["chance"] == 0.25
    assert by_key["blimp", "acc"]["chance"] == 0.5
    assert ("blimp", "acc_norm") not in by_key
    assert 0.0 <= by_key["hellaswag", "acc_norm"]["value"] <= 1.0
    assert by_key["lm", "bits_per_byte"]["value"] > 0
    assert by_key["lm", "perplexity"]["value"] == pytest.approx(math.exp(by_key["lm", "loss"]["value"]))

    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [r["task"] for r in replies] == ["gsm8k"] * 2 + ["vicuna_bench"] * 2
    assert {"id", "turn", "messages", "reply", "finish", "n_tokens"} <= set(replies[-1])
    printed = capsys.readouterr().out
    assert "chance" in printed
    assert "hellaswag" in printed


@needs_data
def test_lm_token_shards_match_text(checkpoint, tmp_path):
    """The lm task gives the same numbers on a token shard folder as on the text it was made from."""
    tokenizer = Tokenizer.from_file(checkpoint / "tokenizer.json")
    documents = ["Tom had a red ball. He liked to throw it high.", "Sue saw a bird. It sang a happy song for her."]
    text_file = tmp_path / "docs.txt"
    text_file.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    shard_dir = tmp_path / "data"
    dtype = token_dtype(tokenizer.vocab_size)
    write_shards(([tokenizer.eot_id] + tokenizer.encode(d) for d in documents), shard_dir, "val", dtype)
    write_meta(shard_dir, {"tokenizer_fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                           "dtype": dtype.name})

    values = {}
    for name, source in (("text", text_file), ("shards", shard_dir)):
        out = tmp_path / name
        assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", "lm", "--lm_source", str(source),
                     "--stride", "16", "--out_dir", str(out)]) == 0
        rows = json.loads((out / "results.json").read_text())["results"]
        values[name] = {r["metric"]: (r["value"], r["n"], r["bytes"], r["tokens"]) for r in rows}
    assert values["text"]["bits_per_byte"][1:] == (2, sum(len(d) for d in documents), values["text"]["loss"][3])
    for metric in ("loss", "perplexity", "bits_per_byte"):
        assert values["shards"][metric] == pytest.approx(values["text"][metric])


@needs_data
def test_chat_reward_and_compare(checkpoint, tmp_path):
    """Compared with itself, every reply ties, so the win rate is exactly one half."""
    from rlhf.reward import RewardModel, load_reward_model, save_reward_model

    tokenizer = Tokenizer.from_file(checkpoint / "tokenizer.json")
    torch.manual_seed(1)
    trunk = GPT(ModelConfig.from_layout("gpt2", vocab_size=400, n_layer=2, n_head=2, n_embd=32, block_size=64))
    reward_dir = tmp_path / "reward"
    save_reward_model(RewardModel(trunk, tokenizer), reward_dir, tokenizer_file=checkpoint / "tokenizer.json")

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", "mt_bench", "--limit", "2",
                 "--max_new_tokens", "6", "--reward", str(reward_dir), "--compare", str(checkpoint),
                 "--out_dir", str(out)]) == 0
    rows = {r["metric"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["win_rate"]["value"] == 0.5
    assert rows["win_rate"]["ties"] == 4  # 2 prompts x 2 turns
    assert rows["reply_tokens"]["value"] == 6.0
    assert rows["stop_rate"]["value"] == 0.0

    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    conversations = [r["messages"] + [{"role": "assistant", "content": r["reply"]}] for r in replies]
    expected = load_reward_model(reward_dir).score(conversations).tolist()
    assert [r["reward"] for r in replies] == pytest.approx(expected, abs=1e-5)
    assert load_reward_scorer(reward_dir)(conversations) == pytest.approx(expected, abs=1e-5)
    assert replies[1]["messages"][1] == {"role": "assistant", "content": replies[0]["reply"]}


def test_reward_folder_must_be_reward_model(checkpoint):
    with pytest.raises(ValueError, match="contains a language model, not a reward model"):
        load_reward_scorer(checkpoint)


@needs_data
def test_arithmetic_task(checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", "arithmetic", "--limit", "3",
                 "--out_dir", str(out)]) == 0
    rows = {r["metric"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["accuracy"]["n"] == 3
    assert 0.0 <= rows["accuracy"]["value"] <= 1.0
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("What is ") for r in replies)


@needs_data
def test_hub_metric_by_name(checkpoint, tmp_path, monkeypatch):
    """A metric named with --metrics goes through evaluate.load, replaced here by a local module (no Hub)."""
    import evaluate

    loaded = []
    monkeypatch.setattr(evaluate, "load", lambda name: loaded.append(name) or Accuracy(keep_in_memory=True))
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", "arc_easy", "--limit", "3", "--metrics",
                 "accuracy", "--out_dir", str(out)]) == 0
    rows = {r["metric"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert loaded == ["accuracy"]
    assert rows["accuracy/accuracy"]["value"] == rows["acc"]["value"]


def test_config_problems(capsys):
    assert main(["eval", "--checkpoint", "x", "--tasks", "arc,lm", "--compare", "y", "--sources",
                 "{hellaswag_fewshot: a.jsonl, hellaswa: b.jsonl}"]) == 2
    message = capsys.readouterr().err
    assert "tasks ['arc'] are not known" in message
    assert "compare needs a reward model" in message
    assert "sources has unknown keys ['hellaswa']" in message


def test_config_defaults():
    cfg = EvalConfig(checkpoint=Path("runs/x/sft"))
    assert cfg.tasks == ["lm"]
    assert cfg.problems() == []
