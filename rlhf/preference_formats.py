"""Preference record formats: detect the format of a record and convert it to a pair.

A pair is a prompt (a conversation that ends with a user message) and two assistant
replies, chosen and rejected. `detect_format` names the format of a record from its
fields, and `convert_record` converts a record of that format:

    prompt/chosen/rejected  prompt: a string or a message list; chosen, rejected: strings,
                            one assistant message, or the whole conversation (the prompt
                            messages, then the reply)
    chosen/rejected         no prompt: two message lists, or two HH-RLHF transcripts
                            ("\\n\\nHuman: ... \\n\\nAssistant: ..."), that share every turn
                            before the last reply; those shared turns are the prompt
    alpaca-eval             instruction, output_1, output_2, preference (1 or 2 names the
                            preferred output; 0 or 1.5 is a tie, null no judgment)
    shp                     history, human_ref_A, human_ref_B, labels (1: A preferred)

In an HH-RLHF transcript, consecutive turns of one speaker are joined with a blank line.
In nine pairs of hh-rlhf harmless-base test a side has two turns of one speaker in a
row, some because a "Human:" inside an assistant turn lacks the two newlines before it.
With this rule every pair of that split shares its prompt.

Dropped and counted, not errors: pairs whose two replies are identical, AlpacaEval ties
and missing judgments, and pairs whose replies become identical once cut to block_size.
Errors (ValueError naming the file, the record counted from 0, the field and the fix):
a missing or null field, a field of the wrong type, an empty reply string, a prompt that
does not end with a user message, and a transcript that cannot be split into turns.

NOTE: an empty reply in a judged transcript is kept, so the model learns to end its turn
at once there. Four chosen replies of hh-rlhf harmless-base test are
empty (saying nothing was preferred) and five output_2 values of the AlpacaEval
judgments are. Only the explicit formats (prompt/chosen/rejected, message lists, SHP)
reject an empty reply, where it is most likely a mistake.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpt.chat import validate_messages

Messages = list[dict[str, str]]

KNOWN_FORMATS = (
    "prompt/chosen/rejected (strings or message lists)",
    "chosen/rejected (message lists or HH-RLHF transcripts sharing all but the last reply)",
    "alpaca-eval (instruction, output_1, output_2, preference)",
    "shp (history, human_ref_A, human_ref_B, labels)",
)
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    """A prompt and two replies to it, the first preferred.

    Attributes:
        prompt: messages that end with a user message.
        chosen: content of the preferred assistant reply.
        rejected: content of the other reply.
        where: the file (or Hub dataset) and record it came from.
    """

    prompt: Messages
    chosen: str
    rejected: str
    where: str = ""


@dataclass
class LoadStats:
    """Counts of one `rlhf.preference_data.load_pairs` call."""

    records: int = 0
    pairs: int = 0
    identical: int = 0  # dropped: both replies are the same text
    ties: int = 0  # dropped: the judge preferred neither reply
    no_judgment: int = 0  # dropped: the preference is null
    empty_replies: int = 0  # kept: judged transcripts with an empty reply


# ---------------------------------------------------------------------------------------------
# Converting records to pairs


def _field(record: Mapping, name: str, where: str, fmt: str) -> Any:
    value = record.get(name)
    if value is None:
        present = ", ".join(repr(k) for k, v in record.items() if v is not None) or "none"
        raise ValueError(f"{where}: missing or null field {name!r}, which {fmt} records need (fields present: "
                         f"{present}). Add the field or remove the record.")
    return value


def _string(record: Mapping, name: str, where: str, fmt: str) -> str:
    value = _field(record, name, where, fmt)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.60}. "
                         "Fix the record or remove it.")
    return value


def _reply_string(record: Mapping, name: str, where: str, fmt: str) -> str:
    reply = _string(record, name, where, fmt)
    if not reply.strip():
        raise ValueError(f"{where}: field {name!r} is an empty reply. Write the reply or remove the record.")
    return reply


def _prompt_messages(value: Any, where: str) -> Messages:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    messages = validate_messages(messages, f"{where}, field 'prompt'")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: field 'prompt' ends with a {messages[-1]['role']} message; a prompt must end "
                         "with the user message that the replies answer. Move the last reply to chosen and rejected.")
    return messages


def _reply_from_messages(value: Any, prompt: Messages, name: str, where: str) -> str:
    """Return the content of a reply given as a message list, with or without the prompt before it."""
    messages = validate_messages([value] if isinstance(value, Mapping) else value, f"{where}, field {name!r}")
    if messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages) or "none"
        raise ValueError(f"{where}: field {name!r} must hold one assistant reply after the prompt, got the roles "
                         f"[{roles}]. Put the earlier turns in the prompt and keep only the final reply.")
    if not messages[0]["content"].strip():
        raise ValueError(f"{where}: field {name!r} is an empty reply. Write the reply or remove the record.")
    return messages[0]["content"]


def _from_prompt_chosen_rejected(record: Mapping, where: str) -> PreferencePair:
    fmt = "prompt/chosen/rejected"
    prompt = _prompt_messages(_field(record, "prompt", where, fmt), where)
    replies = []
    for name in ("chosen", "rejected"):
        value = _field(record, name, where, fmt)
        replies.append(_reply_string(record, name, where, fmt) if isinstance(value, str)
                       else _reply_from_messages(value, prompt, name, where))
    return PreferencePair(prompt, replies[0], replies[1], where)


def parse_hh_transcript(text: str, where: str, name: str) -> Messages:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages.

    Consecutive turns of one speaker are joined with a blank line, and each turn's text
    is stripped of surrounding whitespace.

    Raises:
        ValueError: the text does not start with a Human or Assistant turn, or has none.
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: field {name!r} is not an HH-RLHF transcript: it must start with "
                         f"'\\n\\nHuman:' and alternate '\\n\\nHuman:' and '\\n\\nAssistant:' turns, got "
                         f"{text!r:.80}. Fix the text, or give prompt, chosen and rejected as separate fields.")
    messages: Messages = []
    for speaker, turn in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], turn.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def _split_shared_prompt(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, str, str]:
    """(prompt, chosen reply, rejected reply) of two conversations that differ in their last reply."""
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError(f"{where}: field {name!r} must end with an assistant reply after at least one user "
                             f"message, got the roles [{', '.join(m['role'] for m in messages)}]. Add the reply "
                             "or remove the record.")
    if chosen[:-1] != rejected[:-1]:
        shorter = min(len(chosen), len(rejected)) - 1  # where they differ when one prompt extends the other
        turn = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), shorter)
        raise ValueError(f"{where}: chosen and rejected differ at message {turn}, before their last reply; the two "
                         "must share every message but the last. Give the prompt as its own field, or fix the "
                         "record.")
    if chosen[-2]["role"] != "user":
        raise ValueError(f"{where}: the message before the last reply is a {chosen[-2]['role']} message; the "
                         "replies must answer a user message. Fix the record or remove it.")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _from_chosen_rejected(record: Mapping, where: str, stats: LoadStats) -> PreferencePair:
    fmt = "chosen/rejected"
    chosen, rejected = _field(record, "chosen", where, fmt), _field(record, "rejected", where, fmt)
    if isinstance(chosen, str) and isinstance(rejected, str):
        conversations = [parse_hh_transcript(chosen, where, "chosen"), parse_hh_transcript(rejected, where, "rejected")]
        judged = True
    elif isinstance(chosen, list) and isinstance(rejected, list):
        conversations = [validate_messages(chosen, f"{where}, field 'chosen'"),
                         validate_messages(rejected, f"{where}, field 'rejected'")]
        judged = False
    else:
        raise ValueError(f"{where}: chosen and rejected must both be HH-RLHF transcripts (strings) or both message "
                         f"lists, got {type(chosen).__name__} and {type(rejected).__name__}. Fix the record.")
    prompt, chosen_reply, rejected_reply = _split_shared_prompt(*conversations, where)
    if not chosen_reply.strip() or not rejected_reply.strip():
        if not judged:
            name = "chosen" if not chosen_reply.strip() else "rejected"
            raise ValueError(f"{where}: field {name!r} ends with an empty reply. Write the reply or remove the record.")
        stats.empty_replies += 1
    return PreferencePair(prompt, chosen_reply, rejected_reply, where)


def _from_alpaca_eval(record: Mapping, where: str, stats: LoadStats) -> PreferencePair | None:
    fmt = "alpaca-eval"
    prompt = _prompt_messages(_string(record, "instruction", where, fmt), where)
    outputs = [_string(record, name, where, fmt) for name in ("output_1", "output_2")]
    preference = record.get("preference")
    if preference is None:
        stats.no_judgment += 1
        return None
    try:
        value = float(preference) if not isinstance(preference, bool) else None
    except ValueError:
        value = None
    if value in (0.0, 1.5):
        stats.ties += 1
        return None
    if value not in (1.0, 2.0):
        raise ValueError(f"{where}: field 'preference' is {preference!r}; expected 1 or 2 (the preferred output), "
                         "0 or 1.5 for a tie, or null for no judgment. Fix the record or remove it.")
    stats.empty_replies += not all(output.strip() for output in outputs)
    chosen = 0 if value == 1.0 else 1
    return PreferencePair(prompt, outputs[chosen], outputs[1 - chosen], where)


def _from_shp(record: Mapping, where: str) -> PreferencePair:
    fmt = "shp"
    prompt = _prompt_messages(_string(record, "history", where, fmt), where)
    replies = [_reply_string(record, name, where, fmt) for name in ("human_ref_A", "human_ref_B")]
    label = _field(record, "labels", where, fmt)
    if label not in (0, 1) or isinstance(label, bool):
        raise ValueError(f"{where}: field 'labels' is {label!r}; expected 1 (human_ref_A preferred) or 0 "
                         "(human_ref_B preferred). Fix the record or remove it.")
    return PreferencePair(prompt, replies[0] if label == 1 else replies[1], replies[1] if label == 1 else replies[0],
                          where)


def detect_format(record: Any, where: str) -> str:
    """Name the preference format of a record from its fields (see the module docstring).

    Raises:
        ValueError: the record is not a mapping, or its fields match no known format.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a record with the fields of a preference format, got "
                         f"{type(record).__name__} {record!r:.60}.")
    present = {key for key, value in record.items() if value is not None}
    if {"instruction", "output_1", "output_2"} <= present:
        return "alpaca-eval"
    if {"history", "human_ref_A", "human_ref_B"} <= present:
        return "shp"
    if "prompt" in present and ("chosen" in present or "rejected" in present):
        return "prompt/chosen/rejected"
    if "chosen" in present or "rejected" in present:
        return "chosen/rejected"
    raise ValueError(f"{where}: unrecognised record format; fields present: "
                     f"{', '.join(map(repr, sorted(present))) or 'none'}. Known formats: {'; '.join(KNOWN_FORMATS)}. "
                     "Rename the fields to one of these.")


def convert_record(record: Mapping, fmt: str, where: str, stats: LoadStats) -> PreferencePair | None:
    """Convert one record of format `fmt` to a pair; None (and a count in `stats`) for a dropped one."""
    if fmt == "alpaca-eval":
        pair = _from_alpaca_eval(record, where, stats)
    elif fmt == "shp":
        pair = _from_shp(record, where)
    elif fmt == "prompt/chosen/rejected":
        pair = _from_prompt_chosen_rejected(record, where)
    else:
        pair = _from_chosen_rejected(record, where, stats)
    if pair is not None and pair.chosen == pair.rejected:
        stats.identical += 1
        return None
    return pair
