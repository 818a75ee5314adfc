"""The chat template: the one place that turns messages into token ids.

A conversation renders as

    <|endoftext|><|system|>CONTENT<|end|><|user|>CONTENT<|end|><|assistant|>CONTENT<|end|>...

The leading `<|endoftext|>` is the document boundary that every pretraining
document starts with. Role markers are special tokens inserted as ids, and
content is encoded with `Tokenizer.encode`, which never reads special tokens
out of text, so a user who types `<|assistant|>` cannot forge a turn. The
prompt for generation is the conversation so far plus `<|assistant|>`, which is,
token for token, a prefix of the same conversation rendered with its reply.

The loss mask marks the assistant's content and its closing `<|end|>`, and
nothing else: a model that never learns to emit `<|end|>` never stops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpt.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"

# The same rendering as a Jinja template for transformers' `apply_chat_template`.
# transformers splits special-token text out of the rendered string, so unlike
# `render_chat` it would read `<|user|>` typed inside content as the special token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def validate_messages(messages: object, source: str = "conversation") -> list[dict[str, str]]:
    """Check a conversation and return it as a list of {"role", "content"} dicts.

    Raises:
        ValueError: naming `source` (for example "data.jsonl, record 12") and the
            message index, for an empty conversation, a message that is not a
            mapping, a missing or unknown role, non-string content, or a system
            message anywhere but first.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError(f"{source}: expected a non-empty list of messages, got {messages!r:.80}")
    checked = []
    for index, message in enumerate(messages):
        where = f"{source}, message {index}"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected a mapping with 'role' and 'content', got {message!r:.80}")
        if "role" not in message or "content" not in message:
            raise ValueError(f"{where}: missing field {'role' if 'role' not in message else 'content'!r}; "
                             f"fields present: {sorted(message)}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")
        if role == "system" and index != 0:
            raise ValueError(f"{where}: a system message may only come first")
        checked.append({"role": role, "content": content})
    return checked


def render_chat(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], *,
                add_generation_prompt: bool = False, source: str = "conversation") -> tuple[list[int], list[int]]:
    """Render messages to token ids and a loss mask of the same length.

    Args:
        tokenizer: the model's tokenizer.
        messages: {"role": "system"|"user"|"assistant", "content": str} dicts.
        add_generation_prompt: append `<|assistant|>` so the model writes the next reply.
        source: names the conversation in error messages.

    Returns:
        (ids, mask): mask[i] is 1 where ids[i] is assistant content or the `<|end|>`
        closing an assistant turn, else 0.
    """
    messages = validate_messages(messages, source)
    end = tokenizer.special_id(END_OF_TURN)
    ids, mask = [tokenizer.eot_id], [0]
    for message in messages:
        content = tokenizer.encode(message["content"])
        trained = 1 if message["role"] == "assistant" else 0
        ids += [tokenizer.special_id(f"<|{message['role']}|>"), *content, end]
        mask += [0] + [trained] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(tokenizer.special_id("<|assistant|>"))
        mask.append(0)
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], source: str = "conversation") -> list[int]:
    """Token ids of the conversation so far followed by `<|assistant|>`: the prompt for the next reply."""
    return render_chat(tokenizer, messages, add_generation_prompt=True, source=source)[0]


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant reply: `<|end|>`, and `<|endoftext|>` for base models."""
    return [tokenizer.special_id(END_OF_TURN), tokenizer.eot_id]
