"""Evaluation tasks: where each data set lives, how its records become prompts, and its few-shot rule.

    lm             loss, perplexity and bits per byte on held-out text (sliding windows)
    arc_easy       ARC-Easy, multiple choice, "Question: ...\\nAnswer:" + " <choice>"
    arc_challenge  ARC-Challenge, the same format
    mmlu           MMLU, 5-shot from the dev split of the same subject, " A".." D" scored
    hellaswag      HellaSwag, "<activity>: <context>" + " <ending>", lm-evaluation-harness preprocessing
    blimp          BLiMP minimal pairs: the good sentence must get the higher total log-likelihood
    lambada        LAMBADA last word: greedy match of all its tokens, and its log-likelihood
    gsm8k          GSM8K, 5-shot "Question: ...\\nAnswer: ..." prompts, greedy, exact match of the final number
    arithmetic     the arithmetic problems of the RL stage, answered in the chat template
    alpaca_eval, mt_bench, vicuna_bench, chat
                   chat prompts: replies saved for reading, with stop share, length and reward

The prompt formats are those of lm-evaluation-harness 0.4 for the same tasks, so scores
compare with the numbers it reports. Few-shot examples come from the task's few-shot
split when it has one (MMLU: the first k dev questions of the subject; the others: a
seeded random draw), else from the evaluated set itself, never the example being asked.

Each data source is a `gpt.catalog.CATALOG` name (local files under $GPTLAB_DATA_DIR, else
the Hugging Face Hub), a local file or glob (.jsonl, .json, .csv or .txt, optionally
gzipped), or a Hub dataset id written "owner/name" or "owner/name:split".
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from gpt.catalog import CATALOG, DATA_DIR_ENV, resolve_files
from gpt.data import iter_texts, load_documents
from gpt.shards import TokenShards, read_meta
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

TaskKind = Literal["perplexity", "multiple_choice", "last_word", "generate", "chat"]


@dataclass(frozen=True)
class TaskSpec:
    """A task: its kind, its data and its few-shot default."""

    name: str
    kind: TaskKind
    source: str  # catalog name of the evaluated split
    fewshot_source: str | None = None  # catalog name of the split few-shot examples come from
    num_fewshot: int = 0
    description: str = ""


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("lm", "perplexity", "tinystories-valid",
             description="loss, perplexity and bits per byte on held-out text"),
    TaskSpec("arc_easy", "multiple_choice", "arc-easy", "arc-easy-dev", description="ARC-Easy science questions"),
    TaskSpec("arc_challenge", "multiple_choice", "arc-challenge", "arc-challenge-dev",
             description="ARC-Challenge science questions"),
    TaskSpec("mmlu", "multiple_choice", "mmlu", "mmlu-dev", num_fewshot=5, description="MMLU, 57 subjects"),
    TaskSpec("hellaswag", "multiple_choice", "hellaswag", "hellaswag-train", description="HellaSwag sentence endings"),
    TaskSpec("blimp", "multiple_choice", "blimp", description="BLiMP grammatical minimal pairs"),
    TaskSpec("lambada", "last_word", "lambada", description="LAMBADA last-word prediction"),
    TaskSpec("gsm8k", "generate", "gsm8k", "gsm8k-train", num_fewshot=5, description="GSM8K math word problems"),
    TaskSpec("arithmetic", "generate", "", description="held-out problems of the RL arithmetic task"),
    TaskSpec("alpaca_eval", "chat", "alpaca-eval", description="AlpacaEval instructions"),
    TaskSpec("mt_bench", "chat", "mt-bench", description="MT-Bench two-turn questions"),
    TaskSpec("vicuna_bench", "chat", "vicuna-bench", description="Vicuna benchmark questions"),
    TaskSpec("chat", "chat", "vicuna-bench", description="chat measures on the prompts of the chat_prompts setting"),
)}


@dataclass
class MultipleChoiceExample:
    """A question scored by the log-likelihood of each choice as the continuation of `context`.

    The continuation of choice i is `delimiter + choices[i]`. The length normalization
    divides by the UTF-8 bytes of `choices[i]` alone, without the delimiter.
    """

    context: str
    choices: list[str]
    gold: int
    delimiter: str = " "
    group: str = ""  # subject, paradigm or field, for per-group scores

    def continuations(self) -> list[str]:
        return [self.delimiter + choice for choice in self.choices]


@dataclass
class GenerationExample:
    """A prompt answered by greedy generation and compared with `reference`."""

    id: str
    prompt: str
    reference: str


@dataclass
class ChatPrompt:
    """User turns of one conversation; each turn gets a reply before the next is sent."""

    id: str
    turns: list[str]
    category: str = ""


# ---------------------------------------------------------------------------------------------
# Reading records


_FORMATS = (".jsonl", ".json", ".csv", ".txt")


def _format_of(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((suffix for suffix in _FORMATS if name.endswith(suffix)), None)


def _read_text(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: invalid UTF-8 at byte {error.start}; convert the file to UTF-8") from error


def read_file_records(path: str) -> list[dict]:
    """Read one .jsonl, .json, .csv or .txt file (optionally .gz) as a list of dict records.

    A .json file contains a list of objects, a .csv file has a header row, and each
    non-empty line of a .txt file becomes {"text": line}. Every record also gets
    "_file", its path.

    Raises:
        ValueError: an unknown suffix, invalid UTF-8, or a line or record that is not a JSON object.
    """
    kind = _format_of(path)
    if kind is None:
        raise ValueError(f"{path}: unsupported file type; use .jsonl, .json, .csv or .txt, optionally gzipped")
    text = _read_text(path)
    records: list = []
    if kind == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); each line must be one "
                                 f"JSON object") from error
    elif kind == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from error
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
    elif kind == ".csv":
        records = list(csv.DictReader(io.StringIO(text)))
    else:
        records = [{"text": line} for line in text.splitlines() if line.strip()]
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}, record {index}: expected a JSON object, got {type(record).__name__}")
        record["_file"] = path
    return records


def _local_files(source: str) -> list[str] | None:
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and _format_of(str(p))
                       and not p.name.upper().startswith(("LICENSE", "README", ".")))
        return files or None
    if any(c in path for c in "*?["):
        return sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p)) or None
    return None


def _load_hub(hub_id: str, config: str | None, split: str, fix: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    # Offline, datasets raises ConnectionError, FileNotFoundError or a Hub error depending on the cache.
    except Exception as error:
        raise ValueError(f"loading {hub_id!r} (config {config!r}, split {split!r}) from the Hugging Face Hub failed: "
                         f"{error}. {fix}") from error
    return [dict(record) for record in ds]


def load_records(source: str) -> list[dict]:
    """Load the records of a data source: a catalog name, a local file, folder or glob, or a Hub id.

    Raises:
        ValueError: the source names nothing, a catalog entry's local files are missing
            under $GPTLAB_DATA_DIR, a file is malformed, or the Hub load failed.
    """
    fix = "Pass a local file instead (--sources '{TASK: FILE.jsonl}'), or run where the Hub is reachable."
    entry = CATALOG.get(source)
    if entry is not None:
        files = resolve_files(entry)
        if files is None and os.environ.get(DATA_DIR_ENV) and entry.local:
            raise ValueError(f"catalog entry {source!r}: no file matches {', '.join(entry.local)} under "
                             f"{DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]}; point {DATA_DIR_ENV} at the data kit")
        if files is None:
            if not entry.hub_id:
                raise ValueError(f"catalog entry {source!r} exists only as local files ({', '.join(entry.local)}); "
                                 f"set {DATA_DIR_ENV} to the folder that contains them")
            return _load_hub(entry.hub_id, entry.hub_config, entry.hub_split, fix)
        return [record for path in files for record in read_file_records(path)]

    files = _local_files(source)
    if files is not None:
        records = [record for path in files for record in read_file_records(path)]
        if not records:
            raise ValueError(f"{', '.join(files[:3])}: no records found; check that it contains the task's data")
        return records
    if _format_of(source) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(f"data source {source!r} not found: it is not a catalog name ({', '.join(CATALOG)}), "
                         f"an existing file or folder, or a Hub id written owner/name[:split]")
    hub_id, _, split = source.partition(":")
    return _load_hub(hub_id, None, split or "test", fix)


def _field(record: dict, name: str, source: str, index: int):
    if name not in record:
        where = record.get("_file", source)
        fields = ", ".join(sorted(k for k in record if k != "_file"))
        raise ValueError(f"{where}, record {index}: missing field {name!r} (fields present: {fields}); "
                         f"is this the data of the right task?")
    return record[name]


def take(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def take_spread(groups: dict[str, list], limit: int | None) -> list:
    """Take up to `limit` items in all, the same number from each group in order, so that a
    small limit still covers every group (MMLU subjects, BLiMP paradigms)."""
    if limit is None:
        return [item for items in groups.values() for item in items]
    per_group = -(-limit // max(len(groups), 1))
    return [item for items in groups.values() for item in items[:per_group]][:limit]


# ---------------------------------------------------------------------------------------------
# Multiple choice


def _arc_example(record: dict, index: int, source: str) -> MultipleChoiceExample:
    question = _field(record, "question", source, index)
    if isinstance(question, dict):  # the official jsonl: {"stem", "choices": [{"text", "label"}]}
        stem = question["stem"]
        texts = [choice["text"] for choice in question["choices"]]
        labels = [choice["label"] for choice in question["choices"]]
    else:  # the Hub: question text, choices {"text": [...], "label": [...]}
        stem = question
        choices = _field(record, "choices", source, index)
        texts, labels = list(choices["text"]), list(choices["label"])
    answer = str(_field(record, "answerKey", source, index))
    if answer not in labels:
        raise ValueError(f"{record.get('_file', source)}, record {index}: answerKey {answer!r} is not one of the "
                         f"choice labels {labels}")
    return MultipleChoiceExample(f"Question: {stem}\nAnswer:", texts, labels.index(answer))


def _mmlu_subject(record: dict) -> str:
    if record.get("subject"):
        return str(record["subject"])
    name = Path(record.get("_file", "")).name
    return re.sub(r"_(test|dev|val)\.csv(\.gz)?$", "", name)


def _mmlu_fields(record: dict, index: int, source: str) -> tuple[str, list[str], int]:
    if "choices" in record:  # the Hub layout
        choices = list(record["choices"])
    else:  # the converted CSV layout: choice0..choice3
        choices = [_field(record, f"choice{i}", source, index) for i in range(4)]
    return str(_field(record, "question", source, index)).strip(), choices, int(_field(record, "answer", source, index))


def _mmlu_block(question: str, choices: list[str]) -> str:
    lines = [question] + [f"{letter}. {choice}" for letter, choice in zip("ABCD", choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_examples(records: list[dict], dev_records: list[dict], num_fewshot: int, limit: int | None,
                  source: str) -> list[MultipleChoiceExample]:
    """Build MMLU prompts as lm-evaluation-harness writes them: a subject header, the first k
    solved dev questions of the same subject, then the question. The choices are " A".." D"."""
    dev_by_subject: dict[str, list[str]] = {}
    for index, record in enumerate(dev_records):
        question, choices, answer = _mmlu_fields(record, index, "mmlu dev split")
        solved = f"{_mmlu_block(question, choices)} {'ABCD'[answer]}"
        dev_by_subject.setdefault(_mmlu_subject(record), []).append(solved)
    by_subject: dict[str, list[MultipleChoiceExample]] = {}
    for index, record in enumerate(records):
        subject = _mmlu_subject(record)
        question, choices, answer = _mmlu_fields(record, index, source)
        shots = dev_by_subject.get(subject, [])[:num_fewshot]
        if len(shots) < num_fewshot:
            raise ValueError(f"MMLU subject {subject!r} has {len(shots)} dev questions, fewer than num_fewshot="
                             f"{num_fewshot}; lower num_fewshot")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        context = header + "".join(shot + "\n\n" for shot in shots) + _mmlu_block(question, choices)
        by_subject.setdefault(subject, []).append(MultipleChoiceExample(context, list("ABCD"), answer, group=subject))
    return take_spread(by_subject, limit)


def hellaswag_preprocess(text: str) -> str:
    """Clean a HellaSwag string as lm-evaluation-harness does: WikiHow "[title]" markers become
    ". ", other bracketed markers are dropped, and double spaces become single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_example(record: dict, index: int, source: str) -> MultipleChoiceExample:
    ctx = _field(record, "ctx_a", source, index) + " " + _field(record, "ctx_b", source, index).capitalize()
    query = hellaswag_preprocess(_field(record, "activity_label", source, index) + ": " + ctx)
    endings = [hellaswag_preprocess(ending) for ending in _field(record, "endings", source, index)]
    return MultipleChoiceExample(query, endings, int(_field(record, "label", source, index)))


def _blimp_example(record: dict, index: int, source: str) -> MultipleChoiceExample:
    good, bad = _field(record, "sentence_good", source, index), _field(record, "sentence_bad", source, index)
    # Empty context: each sentence is scored whole, from the end-of-text token alone.
    return MultipleChoiceExample("", [good, bad], 0, delimiter="", group=str(record.get("UID", "")))


def add_fewshot(examples: list[MultipleChoiceExample], pool: list[MultipleChoiceExample] | None, k: int,
                seed: int) -> None:
    """Prefix each example's context with k solved examples drawn at random from `pool`, or
    from `examples` itself (never the example being asked) when `pool` is None."""
    if k <= 0:
        return
    rng = random.Random(seed)
    candidates = pool if pool is not None else examples
    needed = k + (pool is None)  # drawing from the examples themselves leaves out the one asked
    if len(candidates) < needed:
        raise ValueError(f"num_fewshot={k} needs at least {needed} examples to draw from, but only {len(candidates)} "
                         f"exist; lower num_fewshot")
    # Solved texts are built before any context changes, so shots never carry shots of their own.
    solved = [f"{c.context}{c.delimiter}{c.choices[c.gold]}\n\n" for c in candidates]
    for example in examples:
        drawn = rng.sample(range(len(candidates)), min(k + 1, len(candidates)))
        shots = [i for i in drawn if candidates[i] is not example][:k]
        example.context = "".join(solved[i] for i in shots) + example.context


_MC_CONVERTERS: dict[str, Callable[[dict, int, str], MultipleChoiceExample]] = {
    "arc_easy": _arc_example,
    "arc_challenge": _arc_example,
    "hellaswag": _hellaswag_example,
    "blimp": _blimp_example,
}


def multiple_choice_examples(task: str, source: str, fewshot_source: str | None, num_fewshot: int,
                             limit: int | None, seed: int) -> list[MultipleChoiceExample]:
    """Load and format the examples of a multiple-choice task (see `TASKS`)."""
    records = load_records(source)
    if task == "mmlu":
        dev = load_records(fewshot_source) if num_fewshot and fewshot_source else []
        return mmlu_examples(records, dev, num_fewshot, limit, source)
    convert = _MC_CONVERTERS[task]
    if task == "blimp":
        by_paradigm: dict[str, list[MultipleChoiceExample]] = {}
        for index, record in enumerate(records):
            example = convert(record, index, source)
            by_paradigm.setdefault(example.group, []).append(example)
        return take_spread(by_paradigm, limit)
    examples = [convert(record, index, source) for index, record in enumerate(take(records, limit))]
    if num_fewshot:
        pool = None
        if fewshot_source:
            pool = [convert(r, i, fewshot_source) for i, r in enumerate(load_records(fewshot_source))]
        add_fewshot(examples, pool, num_fewshot, seed)
    return examples


# ---------------------------------------------------------------------------------------------
# LAMBADA, GSM8K, chat prompts, held-out text


def lambada_examples(source: str, limit: int | None) -> list[tuple[str, str]]:
    """(context, " last word") pairs: the passage split at its last space."""
    pairs = []
    for index, record in enumerate(take(load_records(source), limit)):
        text = str(_field(record, "text", source, index))
        context, _, word = text.rpartition(" ")
        if not context or not word:
            raise ValueError(f"{record.get('_file', source)}, record {index}: the passage has no space to split off a "
                             f"last word: {text[:60]!r}")
        pairs.append((context, " " + word))
    return pairs


def _gsm8k_shot(record: dict, index: int, source: str) -> str:
    return f"Question: {_field(record, 'question', source, index)}\nAnswer: {_field(record, 'answer', source, index)}"


def gsm8k_examples(source: str, fewshot_source: str | None, num_fewshot: int, limit: int | None,
                   seed: int) -> list[GenerationExample]:
    """GSM8K prompts: k solved training problems, then "Question: ...\\nAnswer:"; the reference
    is the whole solution, whose final answer follows "####"."""
    records = take(load_records(source), limit)
    pool = [_gsm8k_shot(r, i, fewshot_source) for i, r in enumerate(load_records(fewshot_source))] \
        if num_fewshot and fewshot_source else []
    if num_fewshot and len(pool) < num_fewshot:
        raise ValueError(f"num_fewshot={num_fewshot} needs {num_fewshot} solved problems, but "
                         f"{fewshot_source!r} has {len(pool)}")
    rng = random.Random(seed)
    examples = []
    for index, record in enumerate(records):
        shots = rng.sample(pool, num_fewshot) if num_fewshot else []
        question = _field(record, "question", source, index)
        prompt = "".join(shot + "\n\n" for shot in shots) + f"Question: {question}\nAnswer:"
        examples.append(GenerationExample(str(index), prompt, str(_field(record, "answer", source, index))))
    return examples


def chat_prompts(source: str, limit: int | None) -> list[ChatPrompt]:
    """Chat prompts from records with "turns" (MT-Bench, Vicuna), "instruction" and an optional
    "input" (AlpacaEval, Self-Instruct), or "prompt" (Arena-Hard) or "question"."""
    prompts = []
    for index, record in enumerate(take(load_records(source), limit)):
        if "turns" in record:
            turns = [str(turn) for turn in record["turns"]]
        elif "instruction" in record:
            extra_input = record.get("input") or ""
            instances = record.get("instances") or []
            if not extra_input and instances and isinstance(instances[0], dict):
                extra_input = instances[0].get("input") or ""
            turns = [str(record["instruction"]) + (f"\n\n{extra_input}" if extra_input else "")]
        elif "prompt" in record:
            prompt = record["prompt"]
            turns = [str(t) for t in prompt] if isinstance(prompt, list) else [str(prompt)]
        elif "question" in record:
            turns = [str(record["question"])]
        else:
            fields = ", ".join(sorted(k for k in record if k != "_file"))
            raise ValueError(f"{record.get('_file', source)}, record {index}: no prompt field; expected turns, "
                             f"instruction, prompt or question, found {fields}")
        prompt_id = str(record.get("question_id", record.get("id", record.get("uid", index))))
        category = str(record.get("category", record.get("dataset", "")))
        prompts.append(ChatPrompt(prompt_id, turns, category))
    return prompts


def lm_documents(source: str, limit: int | None) -> list[str]:
    """Read held-out documents for the lm task with `gpt.data.load_documents`."""
    documents = list(iter_texts(load_documents(source)))
    return take(documents, limit)


def lm_shard_tokens(folder: Path, tokenizer: Tokenizer, limit: int | None) -> tuple[np.ndarray, int, int]:
    """Read the val split of a token shard folder (the part of the corpus that pretraining held out).

    Returns:
        (tokens, number of documents, UTF-8 bytes of their text), cut after `limit` documents.

    Raises:
        ValueError: the shards were made with another tokenizer.
    """
    meta = read_meta(folder)
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise ValueError(f"token shards in {folder} were made with tokenizer {meta.get('tokenizer_fingerprint')}, not "
                         f"the checkpoint's ({tokenizer.fingerprint}); evaluate on the data folder of the same run")
    tokens = np.asarray(TokenShards(folder, "val").tokens[:], dtype=np.int64)
    starts = np.flatnonzero(tokens == tokenizer.eot_id)
    if limit is not None and len(starts) > limit:
        tokens = tokens[:starts[limit]]
    n_documents = int((tokens == tokenizer.eot_id).sum())
    # Special tokens stand for no text, so they count zero bytes.
    token_lengths = np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)])
    token_lengths[:len(SPECIAL_TOKENS)] = 0
    return tokens, n_documents, int(token_lengths[tokens].sum())


def random_chance(examples: Sequence[MultipleChoiceExample]) -> float:
    """Expected accuracy of a uniform random guess: the mean of 1 / number of choices."""
    return sum(1 / len(e.choices) for e in examples) / max(len(examples), 1)
