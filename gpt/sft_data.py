"""Chat data for supervised fine-tuning: load instruction sets as conversations, mix them,
hold some out, and fit each one into block_size tokens.

A conversation is a list of {"role", "content"} messages (roles system, user, assistant)
that ends with an assistant turn. `load_conversations` reads a catalog name, a local
file, folder or glob, or a Hub dataset, detects the record format from the fields of
the first record of each file, and converts every record:

    alpaca             instruction, input (optional), output
    gpteacher          instruction, input (optional), response
    dolly              instruction, context, response
    self-instruct      instruction, instances [{input, output}]: one conversation per instance
    sharegpt           conversations [{from, value}]
    openai             messages (or conversations) [{role, content}]
    oasst              message_id, parent_id, role (prompter/assistant), text: one message
                       per record; each tree gives its best-ranked root-to-leaf path
    taskmaster         utterances [{speaker, text}]
    chitchat           messages [[{sender, text}, ...] per turn], two senders
    prompt/completion  prompt, completion (or response)
    question/answer    question, answer (GSM8K)

The user message of the instruction formats is the instruction, followed by a blank
line and the input (or context) when that is not empty. A top-level "system" string
becomes a leading system message. Trailing user turns are dropped so that every
conversation ends with the assistant. Dialog transcripts whose roles come from who is
speaking (chitchat, taskmaster) merge consecutive messages of one speaker, and a
transcript with no reply from the second speaker is skipped and counted. In every
other format a record without an assistant turn is an error.

JSON and JSON Lines files are read with the json module, not `datasets`. `datasets`
reads an object keyed by id (the chitchat file) as one row with thousands of columns.
Its Arrow schema also fills absent fields with null and rejects a file whose records
disagree in type, which hides which record is bad. Read directly, every error names the
file, the record (and the line of a .jsonl file), the field and the fix. Parquet files
and Hub datasets are read with `datasets`.

Limits: oasst trees keep every language and only their best-ranked path. Taskmaster's
API-call annotations are not kept.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import datasets
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from huggingface_hub.errors import HFValidationError

from gpt.chat import render_chat, validate_messages
from gpt.data import CATALOG, DATA_DIR_ENV, _data_dir, _expand_local, _file_format, _looks_like_path, resolve_files
from gpt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Conversation = list[dict[str, str]]

DEFAULT_NAMES = {"name": "gptlab", "author": "the gptlab developers"}
# Catalog sets whose text contains {{name}} and {{author}} placeholders. Other catalog sets are
# never filled, because code in them can contain the same braces (Jinja, Handlebars).
PLACEHOLDER_SETS = frozenset({"identity"})

KNOWN_FORMATS = (
    "alpaca (instruction, input, output)",
    "gpteacher (instruction, input, response)",
    "dolly (instruction, context, response)",
    "self-instruct (instruction, instances)",
    "sharegpt (conversations of {from, value})",
    "openai (messages of {role, content})",
    "oasst (message_id, parent_id, role, text)",
    "taskmaster (utterances of {speaker, text})",
    "chitchat (messages of turns of {sender, text})",
    "prompt/completion (prompt, completion or response)",
    "question/answer (question, answer)",
)

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant"}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
SPEAKER_ROLES = {"user": "user", "assistant": "assistant"}


# ---------------------------------------------------------------------------------------------
# Reading records


Records = Iterable[tuple[str, Any]]  # (where, record): where names the file and record in errors


def _open_text(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _json_error(path: str, e: json.JSONDecodeError, line: int | None = None) -> ValueError:
    where = f"{path}, line {line if line is not None else e.lineno}"
    return ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}). Fix the JSON or remove the record.")


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    index = 0
    try:
        with _open_text(path) as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _json_error(path, e, line_number) from e
                yield f"{path}, record {index} (line {line_number})", record
                index += 1
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start}). Save the file as UTF-8.") from e


def _json_records(path: str) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            # json.loads decodes bytes as UTF-8 about twice as fast as reading through a text wrapper.
            content = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start}). Save the file as UTF-8.") from e
    if isinstance(content, list):
        for index, record in enumerate(content):
            yield f"{path}, record {index}", record
    elif isinstance(content, dict) and content and all(isinstance(v, dict) for v in content.values()):
        # Records keyed by id, as in the chitchat file.
        for index, (key, record) in enumerate(content.items()):
            yield f"{path}, record {index} (id {key!r})", record
    elif isinstance(content, dict):
        yield f"{path}, record 0", content
    else:
        raise ValueError(f"{path}: expected a JSON list of records or an object of records keyed by id, "
                         f"got a JSON {type(content).__name__}.")


def _parquet_records(path: str) -> Iterator[tuple[str, Any]]:
    try:
        ds = datasets.load_dataset("parquet", data_files=[path], split="train")
    except DatasetGenerationError as e:
        raise ValueError(f"{path}: not a readable parquet file ({e.__cause__ or e}).") from e
    for index, row in enumerate(ds):
        yield f"{path}, record {index}", row


def _hub_records(hub_id: str, config: str | None, split: str, catalog_name: str | None = None) -> Iterator[tuple[str, Any]]:
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError, HFValidationError) as e:
        local_names = ", ".join(name for name, entry in CATALOG.items() if entry.kind == "sft" and entry.local)
        if catalog_name is not None:
            raise ValueError(f"catalog entry {catalog_name!r}: loading {hub_id!r} from the Hugging Face Hub failed: "
                             f"{e}. Connect to the internet, or use a chat set with local files ({local_names}) "
                             f"and set {DATA_DIR_ENV}.") from e
        raise ValueError(
            f"{hub_id!r} is neither a chat catalog name nor a local file or folder, and loading it from the "
            f"Hugging Face Hub failed: {e}. Check the name, pass a local path, or use a catalog name "
            f"({', '.join(name for name, entry in CATALOG.items() if entry.kind == 'sft')})."
        ) from e
    label = f"{hub_id}" + (f" ({config})" if config else "") + f" split {split}"
    for index, row in enumerate(ds):
        yield f"{label}, record {index}", row


def _local_records(path: str) -> Iterator[tuple[str, Any]]:
    file_format = _file_format(path)
    if file_format == "jsonl":
        return _jsonl_records(path)
    if file_format == "json":
        return _json_records(path)
    if file_format == "parquet":
        return _parquet_records(path)
    raise ValueError(f"{path}: chat data must be .json, .jsonl, .json.gz, .jsonl.gz or .parquet; plain text "
                     "has no roles. Convert it to JSON Lines records with a 'messages' list.")


def _record_streams(source: str, split: str) -> list[tuple[str, Records]]:
    """Return (label, records) for each file of `source`, or one pair for a Hub dataset."""
    entry = CATALOG.get(source)
    if entry is not None:
        if entry.kind != "sft":
            sft_names = ", ".join(name for name, e in CATALOG.items() if e.kind == "sft")
            raise ValueError(f"catalog entry {source!r} is {entry.kind} data, not chat data. Chat catalog "
                             f"names: {sft_names}.")
        files = resolve_files(entry)
        if files is None:
            if _data_dir() is not None and entry.local:
                raise ValueError(
                    f"catalog entry {source!r}: {DATA_DIR_ENV}={_data_dir()} has no file matching "
                    f"{', '.join(entry.local)}. Point {DATA_DIR_ENV} at the data kit folder"
                    + (f", or unset it to load {entry.hub_id!r} from the Hub." if entry.hub_id else ".")
                )
            if not entry.hub_id:
                raise ValueError(f"catalog entry {source!r} exists only as local files ({', '.join(entry.local)}). "
                                 f"Set {DATA_DIR_ENV} to the data kit folder that contains them.")
            return [(entry.hub_id, _hub_records(entry.hub_id, entry.hub_config, entry.hub_split, source))]
    else:
        files = _expand_local(source)
        if files is None:
            if _looks_like_path(source):
                raise ValueError(f"chat data path {source!r} not found. Check the path, or use a catalog name.")
            return [(source, _hub_records(source, None, split))]
    return [(path, _local_records(path)) for path in files]


# ---------------------------------------------------------------------------------------------
# Converting records to conversations


def _fields_found(record: Mapping) -> str:
    return ", ".join(map(repr, record)) or "none"


def _field(record: Mapping, name: str, where: str, fmt: str) -> Any:
    """Return the field `name` of a record, which must be present and not null."""
    value = record.get(name)
    if value is None:
        raise ValueError(f"{where}: missing field {name!r}, which {fmt} records need (fields found: "
                         f"{_fields_found(record)}). Add the field or remove the record.")
    return value


def _text(record: Mapping, name: str, where: str, fmt: str, *, optional: bool = False) -> str:
    """Return the string field `name` of a record; "" for an absent optional field."""
    if optional and record.get(name) is None:
        return ""
    value = _field(record, name, where, fmt)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__} "
                         f"{value!r:.60}. Fix the record or remove it.")
    return value


def _finish(messages: Conversation, where: str, system: Any = None) -> Conversation:
    """Add a leading system message, drop trailing user turns and validate the result."""
    if isinstance(system, str) and system.strip():
        messages = [{"role": "system", "content": system}, *messages]
    if not messages:
        raise ValueError(f"{where}: empty conversation (no messages). Remove the record.")
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise ValueError(f"{where}: conversation has no assistant turn (roles: {roles}). Each conversation needs "
                         "an assistant reply to train on; add one or remove the record.")
    while messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    return validate_messages(messages, where)


def _user_text(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _from_instruction(record: Mapping, where: str) -> list[Conversation]:
    if "context" in record:
        fmt, extra_field, reply_field = "dolly", "context", "response"
    elif "output" in record or "response" not in record:
        fmt, extra_field, reply_field = "alpaca", "input", "output"
    else:
        fmt, extra_field, reply_field = "gpteacher", "input", "response"
    user = _user_text(_text(record, "instruction", where, fmt), _text(record, extra_field, where, fmt, optional=True))
    reply = _text(record, reply_field, where, fmt)
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return [_finish(messages, where, record.get("system"))]


def _from_self_instruct(record: Mapping, where: str) -> list[Conversation]:
    instruction = _text(record, "instruction", where, "self-instruct")
    instances = _field(record, "instances", where, "self-instruct")
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"{where}: field 'instances' must be a non-empty list of {{input, output}}, got "
                         f"{instances!r:.60}. Fix the record or remove it.")
    conversations = []
    for index, instance in enumerate(instances):
        at = f"{where}, instance {index}"
        if not isinstance(instance, Mapping):
            raise ValueError(f"{at}: expected an object with 'input' and 'output', got {instance!r:.60}.")
        user = _user_text(instruction, _text(instance, "input", at, "self-instruct", optional=True))
        reply = _text(instance, "output", at, "self-instruct")
        conversations.append(_finish([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], at))
    return conversations


def _from_pair(prompt_field: str, reply_fields: tuple[str, ...], fmt: str) -> Callable[[Mapping, str], list[Conversation]]:
    def convert(record: Mapping, where: str) -> list[Conversation]:
        reply_field = next((name for name in reply_fields if name in record), reply_fields[0])
        messages = [{"role": "user", "content": _text(record, prompt_field, where, fmt)},
                    {"role": "assistant", "content": _text(record, reply_field, where, fmt)}]
        return [_finish(messages, where, record.get("system"))]
    return convert


def _role_messages(record: Mapping, where: str, fmt: str, role_field: str, content_field: str,
                   roles: Mapping[str, str]) -> Conversation:
    """Convert a list of messages that each name their role (ShareGPT, OpenAI)."""
    key = "messages" if "messages" in record else "conversations"
    turns = _field(record, key, where, fmt)
    if not isinstance(turns, list):
        raise ValueError(f"{where}: field {key!r} must be a list of messages, got {type(turns).__name__}.")
    if not turns:
        raise ValueError(f"{where}: empty conversation (field {key!r} has no messages). Remove the record.")
    messages = []
    for index, turn in enumerate(turns):
        at = f"{where}, {key}[{index}]"
        if not isinstance(turn, Mapping):
            raise ValueError(f"{at}: expected an object with {role_field!r} and {content_field!r}, got {turn!r:.60}.")
        role = _text(turn, role_field, at, fmt)
        if role.lower() not in roles:
            raise ValueError(f"{at}: unknown role {role!r} in field {role_field!r}; expected one of "
                             f"{', '.join(roles)}. Rename the role or remove the message.")
        messages.append({"role": roles[role.lower()], "content": _text(turn, content_field, at, fmt)})
    return messages


def _from_sharegpt(record: Mapping, where: str) -> list[Conversation]:
    messages = _role_messages(record, where, "sharegpt", "from", "value", SHAREGPT_ROLES)
    return [_finish(messages, where, record.get("system"))]


def _from_openai(record: Mapping, where: str) -> list[Conversation]:
    roles = {role: role for role in ("system", "user", "assistant")}
    return [_finish(_role_messages(record, where, "openai", "role", "content", roles), where)]


def _append_merged(messages: Conversation, role: str, text: str) -> None:
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"] += "\n" + text
    else:
        messages.append({"role": role, "content": text})


def _from_taskmaster(record: Mapping, where: str) -> list[Conversation]:
    utterances = _field(record, "utterances", where, "taskmaster")
    if not isinstance(utterances, list):
        raise ValueError(f"{where}: field 'utterances' must be a list, got {type(utterances).__name__}.")
    messages: Conversation = []
    for index, utterance in enumerate(utterances):
        at = f"{where}, utterances[{index}]"
        if not isinstance(utterance, Mapping):
            raise ValueError(f"{at}: expected an object with 'speaker' and 'text', got {utterance!r:.60}.")
        speaker = _text(utterance, "speaker", at, "taskmaster")
        if speaker.lower() not in SPEAKER_ROLES:
            raise ValueError(f"{at}: unknown role {speaker!r} in field 'speaker'; expected USER or ASSISTANT "
                             "(any case). Rename it or remove the utterance.")
        text = _text(utterance, "text", at, "taskmaster")
        if text.strip():
            _append_merged(messages, SPEAKER_ROLES[speaker.lower()], text)
    if not any(m["role"] == "assistant" for m in messages):
        return []  # a transcript with no reply
    return [_finish(messages, where)]


def _from_chitchat(record: Mapping, where: str) -> list[Conversation]:
    turns = _field(record, "messages", where, "chitchat")
    if not isinstance(turns, list):
        raise ValueError(f"{where}: field 'messages' must be a list of turns, got {type(turns).__name__}.")
    roles: dict[str, str] = {}  # sender id -> role: the first to write text plays the user
    messages: Conversation = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, list):
            raise ValueError(f"{where}, messages[{index}]: expected a list of {{sender, text}} messages, "
                             f"got {type(turn).__name__}.")
        for position, message in enumerate(turn):
            text = message.get("text") if isinstance(message, dict) else None
            if not isinstance(text, str):
                at = f"{where}, messages[{index}][{position}]"
                if not isinstance(message, dict):
                    raise ValueError(f"{at}: expected an object with 'sender' and 'text', got {message!r:.60}.")
                _text(message, "text", at, "chitchat")  # raises the error for a missing or non-string text
            if not text.strip():
                continue
            sender = str(message.get("sender"))
            if sender not in roles:
                if len(roles) == 2:
                    raise ValueError(f"{where}, messages[{index}][{position}]: a third sender {sender!r}; chitchat "
                                     "conversations have two. Remove the conversation.")
                roles[sender] = ("user", "assistant")[len(roles)]
            _append_merged(messages, roles[sender], text)
    if not any(m["role"] == "assistant" for m in messages):
        return []  # only one person wrote: no reply to train on
    return [_finish(messages, where)]


def _from_oasst(records: list[tuple[str, Mapping]]) -> tuple[list[Conversation], int]:
    """Flatten message trees to the best-ranked root-to-leaf path of each tree.

    At each message the path follows the reply with the lowest rank (0 is best; unranked
    replies come last, in file order). Taking one path per tree keeps the prompts of bushy
    trees from being repeated once per leaf. Deleted messages and those that failed review
    are left out, with their subtrees.

    Returns:
        (conversations, number of trees skipped because their path has no assistant turn)
    """
    children: dict[str, list[tuple[str, Mapping]]] = defaultdict(list)
    roots = []
    for where, record in records:
        _text(record, "message_id", where, "oasst")
        role = _text(record, "role", where, "oasst")
        _text(record, "text", where, "oasst")
        if role not in OASST_ROLES:
            raise ValueError(f"{where}: unknown role {role!r} in field 'role'; expected prompter or assistant. "
                             "Fix the record or remove it.")
        if record.get("deleted") is True or record.get("review_result") is False:
            continue
        parent_id = record.get("parent_id")
        if parent_id is None:
            roots.append((where, record))
        else:
            children[parent_id].append((where, record))

    conversations, skipped = [], 0
    for where, node in roots:
        messages = [{"role": OASST_ROLES[node["role"]], "content": node["text"]}]
        seen = {node["message_id"]}
        while children.get(node["message_id"]):
            replies = children[node["message_id"]]
            _, node = min(replies, key=lambda pair: (pair[1].get("rank") is None, pair[1].get("rank") or 0))
            if node["message_id"] in seen:  # a repeated message_id links back to an earlier message
                break
            seen.add(node["message_id"])
            messages.append({"role": OASST_ROLES[node["role"]], "content": node["text"]})
        if not any(m["role"] == "assistant" for m in messages):
            skipped += 1
            continue
        conversations.append(_finish(messages, where))
    return conversations, skipped


def detect_format(record: Any, where: str) -> str:
    """Return the format name of a record (see the module docstring), from its fields.

    Raises:
        ValueError: the record is not an object, or its fields match no known format.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object with the fields of a chat format, got "
                         f"{type(record).__name__} {record!r:.60}.")
    for key in ("messages", "conversations"):
        if key in record:
            turns = record[key]
            first = turns[0] if isinstance(turns, list) and turns else None
            if isinstance(first, list):
                return "chitchat"
            if isinstance(first, Mapping) and ("from" in first or "value" in first):
                return "sharegpt"
            return "openai"
    if "utterances" in record:
        return "taskmaster"
    if "message_id" in record and "parent_id" in record:
        return "oasst"
    if "instruction" in record:
        return "self-instruct" if "instances" in record else "instruction"
    if "prompt" in record and ("completion" in record or "response" in record):
        return "prompt/completion"
    if "question" in record and "answer" in record:
        return "question/answer"
    raise ValueError(f"{where}: unrecognised record format; fields found: {_fields_found(record)}. Known formats: "
                     f"{'; '.join(KNOWN_FORMATS)}. Rename the fields to one of these.")


CONVERTERS: dict[str, Callable[[Mapping, str], list[Conversation]]] = {
    "instruction": _from_instruction,
    "self-instruct": _from_self_instruct,
    "sharegpt": _from_sharegpt,
    "openai": _from_openai,
    "taskmaster": _from_taskmaster,
    "chitchat": _from_chitchat,
    "prompt/completion": _from_pair("prompt", ("completion", "response"), "prompt/completion"),
    "question/answer": _from_pair("question", ("answer",), "question/answer"),
}


def _convert_stream(label: str, records: Records, limit: int) -> tuple[list[Conversation], int]:
    """Convert one file's records, in the format of its first record; stop after `limit` (0: all).

    Returns:
        (conversations, number of records skipped because they hold no reply)
    """
    iterator = iter(records)
    first = next(iterator, None)
    if first is None:
        raise ValueError(f"{label}: no records. Remove the file or add records.")
    fmt = detect_format(first[1], first[0])
    if fmt == "oasst":
        rows = [first, *iterator]
        for where, record in rows:
            if not isinstance(record, Mapping):
                raise ValueError(f"{where}: expected an oasst message object, got {record!r:.60}.")
        conversations, skipped = _from_oasst(rows)
        return (conversations[:limit] if limit else conversations), skipped

    convert = CONVERTERS[fmt]
    conversations, skipped = [], 0
    for where, record in itertools.chain([first], iterator):
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a JSON object like the file's first record ({fmt} format), "
                             f"got {type(record).__name__} {record!r:.60}.")
        converted = convert(record, where)
        skipped += not converted
        conversations += converted
        if limit and len(conversations) >= limit:
            return conversations[:limit], skipped
    return conversations, skipped


def fill_placeholders(conversation: Conversation, names: Mapping[str, str]) -> Conversation:
    """Replace each "{{key}}" in the message contents by names[key]; returns a new conversation."""
    pattern = re.compile(r"\{\{(" + "|".join(map(re.escape, names)) + r")\}\}") if names else None
    if pattern is None:
        return [dict(m) for m in conversation]
    return [{**m, "content": pattern.sub(lambda match: names[match.group(1)], m["content"])} for m in conversation]


def load_conversations(source: str, *, split: str = "train", max_examples: int = 0,
                       names: dict[str, str] | None = None) -> list[Conversation]:
    """Load chat or instruction data as conversations.

    Args:
        source: a chat `CATALOG` name (kind "sft"), a local .json, .jsonl, .json.gz,
            .jsonl.gz or .parquet file, a folder or glob of them, or a Hub dataset name.
        split: the split of a Hub dataset; catalog entries use their own hub_split, and
            local files have no splits.
        max_examples: keep the first max_examples conversations, in file order; 0 keeps all.
        names: values for "{{key}}" placeholders. Catalog sets that use placeholders
            (`PLACEHOLDER_SETS`) are filled with `DEFAULT_NAMES` updated by `names`; other
            catalog sets never are. Files and Hub sets named directly are filled only when
            `names` is given.

    Returns:
        Conversations that each end with an assistant turn.

    Raises:
        ValueError: a missing path or catalog file, a file type that is not chat data,
            invalid JSON or UTF-8, or a record in no known format. Also a bad record: a
            missing field, an unknown role, an empty conversation or no assistant turn.
            Messages name the file, the record (and line) and the field.
    """
    if max_examples < 0:
        raise ValueError(f"max_examples={max_examples}; expected 0 (all) or a positive number of conversations.")
    entry = CATALOG.get(source)
    if entry is not None:
        fill = {**DEFAULT_NAMES, **(names or {})} if source in PLACEHOLDER_SETS else None
    else:
        fill = names

    conversations: list[Conversation] = []
    skipped = 0
    for label, records in _record_streams(source, split):
        limit = max_examples - len(conversations) if max_examples else 0
        converted, n_skipped = _convert_stream(label, records, limit)
        conversations += converted
        skipped += n_skipped
        if max_examples and len(conversations) >= max_examples:
            break
    if skipped:
        logger.info("%s: skipped %d dialogs that have no assistant reply", source, skipped)
    if not conversations:
        raise ValueError(f"{source}: no conversation with an assistant reply found. Check that the data contains "
                         "replies as well as prompts.")
    if fill is not None:
        conversations = [fill_placeholders(c, fill) for c in conversations]
    logger.info("%s: %d conversations", source, len(conversations))
    return conversations


# ---------------------------------------------------------------------------------------------
# Mixes and held-out splits


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """Parse "SOURCE[:WEIGHT],SOURCE[:WEIGHT],..." into (source, weight) pairs, in order.

    A weight scales the number of conversations taken from its source: 0.5 takes a random
    half, 1 (the default) takes every conversation once, and 3 takes every conversation
    three times. A fractional part above 1 adds that fraction of extra copies (2.5: every
    conversation twice, and a random half a third time). A source whose name contains
    ":" followed by "/" or "\\" (a URL, a Windows path) is read as a name, not a weight.

    Raises:
        ValueError: an empty entry, a weight that is not a positive finite number, or a
            source listed twice.
    """
    mix: list[tuple[str, float]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"data mix {spec!r} has an empty entry. Write SOURCE[:WEIGHT] entries separated by "
                             "commas, for example 'gpteacher:0.5,identity:3'.")
        source, weight = part, 1.0
        head, colon, tail = part.rpartition(":")
        if colon and head and not any(c in tail for c in "/\\"):
            try:
                weight = float(tail)
            except ValueError:
                raise ValueError(f"data mix entry {part!r}: weight {tail!r} is not a number. Write "
                                 f"{head}:WEIGHT with WEIGHT > 0, for example {head}:0.5.") from None
            source = head.strip()
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"data mix entry {part!r}: weight {weight} must be a positive number "
                             "(below 1 takes a fraction of the source, above 1 repeats it).")
        if any(source == seen for seen, _ in mix):
            raise ValueError(f"data mix {spec!r} lists {source!r} twice. List it once with the combined weight.")
        mix.append((source, weight))
    return mix


def apply_weight(conversations: Sequence[Conversation], weight: float, rng: random.Random) -> list[Conversation]:
    """Take round(weight * n) of n conversations, at least one: whole copies, then a random subset.

    Copies are the same objects, so `split_heldout` can keep them on one side.
    """
    n = len(conversations)
    if n == 0:
        return []
    n_take = max(1, round(weight * n))
    copies, rest = divmod(n_take, n)
    picked = sorted(rng.sample(range(n), rest))
    return [*conversations] * copies + [conversations[i] for i in picked]


def load_mix(spec: str, *, seed: int = 0, split: str = "train", names: dict[str, str] | None = None,
             max_examples: int = 0) -> list[Conversation]:
    """Load a weighted mix of sources (see `parse_mix`): each source in turn, in spec order.

    A single source with no weight loads as `load_conversations` would. The subsets drawn
    for fractional weights depend only on `seed` and the source's name, so adding a source
    to a mix leaves the draws of the others unchanged.

    Args:
        spec: "SOURCE[:WEIGHT],..." with sources as `load_conversations` takes them.
        seed: seed of the random subsets.
        split, names: passed to `load_conversations` for every source.
        max_examples: read at most this many conversations from each source before
            weighting; 0 reads all.

    Returns:
        The conversations of all sources, concatenated in spec order (not shuffled).
    """
    conversations: list[Conversation] = []
    for source, weight in parse_mix(spec):
        loaded = load_conversations(source, split=split, max_examples=max_examples, names=names)
        # A str seed gives the same draws in every run, unlike hash(str), which Python salts per process.
        taken = apply_weight(loaded, weight, random.Random(f"{seed}:{source}"))
        if weight != 1:
            logger.info("%s: weight %g takes %d of %d conversations", source, weight, len(taken), len(loaded))
        conversations += taken
    return conversations


def split_heldout(conversations: Sequence[Conversation], fraction: float,
                  seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Split conversations into (train, heldout) at random, deterministically by seed.

    The split is drawn over distinct conversation objects, so the copies a repeat weight
    makes (`load_mix`) all land on one side: every copy in train, or one copy in heldout.
    Both parts keep the input order. round(fraction * distinct) conversations are held
    out, at least one when fraction > 0 and there are two or more.

    Raises:
        ValueError: fraction outside [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout fraction {fraction} must be in [0, 1), for example 0.05.")
    by_id = {id(c): c for c in conversations}
    distinct = list(by_id)  # object ids in order of first appearance
    n_heldout = round(fraction * len(distinct))
    if fraction > 0 and n_heldout == 0 and len(distinct) >= 2:
        n_heldout = 1
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    held = {distinct[i] for i in order[:n_heldout]}
    train = [c for c in conversations if id(c) not in held]
    heldout = [by_id[i] for i in distinct if i in held]
    return train, heldout


# ---------------------------------------------------------------------------------------------
# Fitting to block_size


class _MemoEncoder:
    """A tokenizer whose `encode` remembers its results, so rendering several prefixes of one
    conversation encodes each message once. Other attributes come from the wrapped tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self._tokenizer.encode(text)
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _fit(tokenizer: _MemoEncoder, conversation: Conversation,
         block_size: int) -> tuple[tuple[list[int], list[int]] | None, int]:
    """Return (fitted ids and mask or None, token count of the whole conversation)."""
    ids, mask = render_chat(tokenizer, conversation)
    if len(ids) <= block_size:
        return (ids, mask), len(ids)
    # Prefixes that end with an assistant turn, shortest first. A prefix of the messages
    # renders to a prefix of the ids, so lengths grow with the index: binary search it.
    ends = [i + 1 for i, message in enumerate(conversation) if message["role"] == "assistant"][:-1]
    best = None
    low, high = 0, len(ends) - 1
    while low <= high:
        middle = (low + high) // 2
        prefix_ids, prefix_mask = render_chat(tokenizer, conversation[:ends[middle]])
        if len(prefix_ids) <= block_size:
            best = (prefix_ids, prefix_mask)
            low = middle + 1
        else:
            high = middle - 1
    return best, len(ids)


def fit_to_block(tokenizer: Tokenizer, conversation: Conversation, block_size: int) -> tuple[list[int], list[int]] | None:
    """Render a conversation with `render_chat` into at most block_size tokens.

    A conversation that is too long loses whole messages from the end, down to the
    longest prefix that ends with an assistant turn and fits.

    Returns:
        (ids, mask) of at most block_size tokens, or None when even the messages up to the
        first assistant turn do not fit (the caller drops the conversation).
    """
    return _fit(_MemoEncoder(tokenizer), conversation, block_size)[0]


@dataclass
class FitResult:
    """Conversations rendered and fitted to block_size, with counts for reporting.

    Attributes:
        examples: (ids, mask) of every conversation kept, in input order.
        kept: the input index of each example.
        lengths: the token count of every input conversation rendered whole.
        truncated: conversations kept after losing turns from the end.
        dropped: conversations whose first exchange does not fit.
    """

    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def fit_conversations(tokenizer: Tokenizer, conversations: Sequence[Conversation], block_size: int) -> FitResult:
    """Apply `fit_to_block` to every conversation and count the truncated and dropped ones."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}; expected a positive number of tokens.")
    result = FitResult()
    for index, conversation in enumerate(conversations):
        fitted, length = _fit(_MemoEncoder(tokenizer), conversation, block_size)
        result.lengths.append(length)
        if fitted is None:
            result.dropped += 1
            continue
        result.truncated += len(fitted[0]) < length
        result.examples.append(fitted)
        result.kept.append(index)
    return result
