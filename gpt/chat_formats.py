"""Chat record formats: detect the format of a record from its fields and convert it to conversations.

A conversation is a list of {"role", "content"} messages (roles system, user, assistant)
that ends with an assistant turn. `convert_records` converts the records of one file,
all in the format that `detect_format` finds in its first record:

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

Limits: oasst trees keep every language and only their best-ranked path. Taskmaster's
API-call annotations are not kept.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable

from gpt.chat import validate_messages
from gpt.records import Records

Conversation = list[dict[str, str]]

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
    # Each format has its usual field, and either field is read when present.
    usual = "messages" if fmt == "openai" else "conversations"
    key = next((name for name in (usual, "messages", "conversations") if name in record), usual)
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


def convert_records(label: str, records: Records, limit: int) -> tuple[list[Conversation], int]:
    """Convert one file's records, in the format of its first record; stop after `limit` (0: all).

    Returns:
        (conversations, number of records skipped because they hold no reply)

    Raises:
        ValueError: a file without records, a record in no known format, or a bad record.
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
