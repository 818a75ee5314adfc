"""The `chat` stage: chat with a checkpoint in the browser, on a Gradio page.

    gptlab chat checkpoint=runs/NAME/sft

The page streams each reply as it is generated and keeps a multi-turn conversation,
with an editable system prompt, sampling controls and Send, Stop, Regenerate and
Clear buttons. Every reply is generated from the whole conversation, rendered by the
chat template of gpt/chat.py (the one fine-tuning trains on), by the engine of
gpt/generate.py, and ends at the end-of-turn token.

Each browser tab has its own conversation in a `gr.State`, which Gradio keeps per
session. The model is shared read-only: every generation allocates its own KV cache,
so several can run at once (`concurrency_limit`) and further requests wait in
Gradio's queue.

The server listens on 127.0.0.1 unless `host` sets another address. It never creates a
public share link and has no login, so anyone who can reach host:port can use it.

Limits: there is no sliding window. A message is rejected, with a request to press
Clear, when the conversation would leave fewer than `min_reply_tokens` of the
model's block_size for the reply, and a reply that reaches block_size ends there.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gradio as gr
import torch

from gpt.chat import render_prompt, stop_token_ids
from gpt.checkpoint import TOKENIZER_FILE, check_checkpoint_dir, load_model
from gpt.config import option
from gpt.device import resolve_device, resolve_dtype
from gpt.generate import SamplingParams, stream
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# A {"role": "user" | "assistant", "content": str} turn of a conversation.
Message = dict[str, str]

EMPTY_REPLY_TEXT = "(empty reply: the model ended its turn at once)"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ChatConfig:
    """Settings of `gptlab chat`. The sampling values are the page's initial settings."""

    checkpoint: Path = dataclasses.field(metadata={"help": "checkpoint folder to chat with (model.safetensors, model.json, tokenizer.json), for example runs/NAME/sft"})
    adapter: Path | None = option(None, "LoRA adapter folder in PEFT format (such as runs/NAME/sft/adapter), merged into the checkpoint's weights at load; none chats with the checkpoint alone")
    host: str = option("127.0.0.1", "address the server listens on; 127.0.0.1 keeps the page on this machine, 0.0.0.0 opens it to the network without any login")
    port: int = option(7860, "TCP port of the page; 0 picks a free port")
    title: str = option("gptlab chat", "title of the page and of the browser tab")
    system_prompt: str = option("", "initial system prompt, editable on the page; empty sends no system message, which suits models fine-tuned without one")
    temperature: float = option(0.7, "initial softmax temperature; 0 picks the most likely token (greedy)")
    top_p: float = option(0.95, "initial nucleus sampling mass in (0, 1]; 1.0 turns the filter off")
    top_k: int = option(50, "initial number of most likely tokens to sample among; 0 turns the filter off")
    repetition_penalty: float = option(1.1, "initial penalty on tokens already in the conversation or the reply (above 1 discourages repeats); 1.0 turns it off")
    max_new_tokens: int = option(256, "initial maximum number of tokens per reply; a reply also ends at the model's block_size")
    min_reply_tokens: int = option(16, "fewest tokens of block_size that must remain for a reply; a longer conversation is rejected with a request to press Clear")
    seed: int | None = option(None, "seed of every reply's sampling, so the same conversation gets the same reply; none draws a fresh seed per reply")
    concurrency_limit: int = option(1, "number of replies generated at the same time; further requests wait in the queue. Each has its own KV cache, so values above 1 are safe, but they share the device")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device to run on: auto picks cuda when available, else cpu")
    dtype: Literal["float32", "bfloat16"] = option("float32", "compute dtype: float32, or bfloat16 autocast (faster on GPUs and recent CPUs)")

    def sampling_params(self) -> SamplingParams:
        """Build the SamplingParams of the initial page settings (without stop ids, which come from the tokenizer)."""
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed)

    def problems(self) -> list[str]:
        found = self.sampling_params().problems()
        if not 0 <= self.port <= 65535:
            found.append(f"port must be in 0..65535 (0 picks a free port), got {self.port}")
        if self.min_reply_tokens < 1:
            found.append(f"min_reply_tokens must be at least 1, got {self.min_reply_tokens}")
        if self.concurrency_limit < 1:
            found.append(f"concurrency_limit must be at least 1, got {self.concurrency_limit}")
        return found


class ConversationTooLong(ValueError):
    """The conversation leaves too little of the model's block_size for a reply."""


def to_chatbot(history: list[Message]) -> list[dict]:
    """Convert the history into gr.Chatbot messages.

    Text goes in as {"type": "text"} parts because Gradio (6.31) passes plain string
    content through inspect.cleandoc, which strips leading spaces and indentation.
    """
    messages = []
    for turn in history:
        text = turn["content"]
        if turn["role"] == "assistant" and not text:
            text = EMPTY_REPLY_TEXT
        messages.append({"role": turn["role"], "content": [{"type": "text", "text": text}]})
    return messages


class ChatResponder:
    """Generate replies for the chat page: the functions its events call.

    It stores no conversation: every call receives the history of one browser
    session, so one responder serves every tab.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, min_reply_tokens: int = 16,
                 seed: int | None = None, dtype: torch.dtype | None = None) -> None:
        # generate_steps restores the train/eval mode it finds. Starting in eval mode
        # makes that a no-op, so concurrent generations never switch dropout on.
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = model.config.block_size
        self.min_reply_tokens = min_reply_tokens
        self.seed = seed
        self.dtype = dtype
        self.stop_ids = stop_token_ids(tokenizer)

    def conversation(self, history: list[Message], system_prompt: str) -> list[Message]:
        """Return the messages to render: the system prompt first when it is non-empty, then the history."""
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        return messages + [{"role": turn["role"], "content": turn["content"]} for turn in history]

    def prompt_ids(self, history: list[Message], system_prompt: str) -> list[int]:
        """Render the prompt for the next reply.

        Raises:
            ConversationTooLong: fewer than min_reply_tokens of block_size would remain.
        """
        ids = render_prompt(self.tokenizer, self.conversation(history, system_prompt), source="chat history")
        room = self.block_size - len(ids)
        if room < self.min_reply_tokens:
            raise ConversationTooLong(
                f"The conversation is {len(ids)} tokens long and the model reads at most {self.block_size} "
                f"(its block_size), which leaves {max(room, 0)} tokens for a reply, fewer than the minimum of "
                f"{self.min_reply_tokens}. Press Clear to start a new conversation, or shorten the message or "
                f"the system prompt.")
        return ids

    def sampling_params(self, temperature: float, top_p: float, top_k: float, repetition_penalty: float,
                        max_new_tokens: float) -> SamplingParams:
        """Build the SamplingParams of the page's controls; raise ValueError listing invalid values."""
        params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_k=int(top_k),
                                top_p=float(top_p), repetition_penalty=float(repetition_penalty),
                                stop_token_ids=self.stop_ids, seed=self.seed)
        params.validate()
        return params

    def stream_reply(self, history: list[Message], system_prompt: str, params: SamplingParams) -> Iterator[str]:
        """Yield the reply to `history` as it grows: each value is the one before plus new text.

        The engine's pieces are whole characters, so no value ends inside a character.
        Nothing is yielded for an empty reply. Closing the iterator stops generation.
        """
        prompt = self.prompt_ids(history, system_prompt)
        start = time.perf_counter()
        pieces = stream(self.model, self.tokenizer, prompt, params, dtype=self.dtype)
        reply = ""
        try:
            for piece in pieces:
                reply += piece
                yield reply
        finally:
            pieces.close()
            seconds = time.perf_counter() - start
            n_tokens = len(pieces.tokens)
            logger.info("reply: %d prompt tokens, %d new tokens in %.2f s (%.1f tokens/s), finish reason %s",
                        len(prompt), n_tokens, seconds, n_tokens / max(seconds, 1e-9),
                        pieces.finish_reason or "stopped by the user")

    # The event handlers below take and return the values of the page's components.

    def add_user_turn(self, message: str, history: list[Message], system_prompt: str):
        """Append the user's message to the history and empty the textbox.

        Returns:
            (textbox value, history, chatbot messages).

        Raises:
            gr.Error: shown on the page when the conversation would not fit; the
                message stays in the textbox.
        """
        if not message.strip():
            gr.Warning("Type a message first.")
            return message, history, to_chatbot(history)
        updated = history + [{"role": "user", "content": message}]
        try:
            self.prompt_ids(updated, system_prompt)
        except ConversationTooLong as error:
            raise gr.Error(str(error), duration=None, print_exception=False) from None
        return "", updated, to_chatbot(updated)

    def respond(self, history: list[Message], system_prompt: str, temperature: float, top_p: float, top_k: float,
                repetition_penalty: float, max_new_tokens: float) -> Iterator[tuple[list[Message], list[dict]]]:
        """Generate the reply to the last user message, yielding (history, chatbot messages) as it grows.

        Yields nothing when the history does not end with a user message.

        Raises:
            gr.Error: shown on the page when the conversation does not fit, a setting
                is invalid, or the device runs out of memory.
        """
        if not history or history[-1]["role"] != "user":
            return
        replies = None
        reply = ""
        try:
            params = self.sampling_params(temperature, top_p, top_k, repetition_penalty, max_new_tokens)
            replies = self.stream_reply(history, system_prompt, params)
            for reply in replies:
                updated = history + [{"role": "assistant", "content": reply}]
                yield updated, to_chatbot(updated)
        except ConversationTooLong as error:
            raise gr.Error(str(error), duration=None, print_exception=False) from None
        except ValueError as error:
            raise gr.Error(f"Cannot generate a reply: {error}", print_exception=False) from None
        except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError in torch >= 2.5
            logger.warning("out of memory while generating a reply to a %d-turn conversation", len(history))
            raise gr.Error("The device ran out of memory while generating. Lower Max new tokens, or press Clear "
                           "to start a shorter conversation.", print_exception=False) from None
        finally:
            if replies is not None:
                replies.close()
        if not reply:
            updated = history + [{"role": "assistant", "content": ""}]
            yield updated, to_chatbot(updated)

    def drop_last_reply(self, history: list[Message]):
        """Remove the last assistant turn, so that `respond` replies to the same user message again.

        Returns:
            (history, chatbot messages).
        """
        if history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not history:
            gr.Warning("There is no message to answer yet.")
        return history, to_chatbot(history)

    def clear(self):
        """Return an empty (history, chatbot messages)."""
        return [], []


def build_app(model: GPT, tokenizer: Tokenizer, cfg: ChatConfig) -> gr.Blocks:
    """Build the chat page for `model`.

    Raises:
        ValueError: a first message, even an empty one, after the initial system prompt
            would leave fewer than cfg.min_reply_tokens of block_size for a reply.
    """
    device = next(model.parameters()).device
    responder = ChatResponder(model, tokenizer, min_reply_tokens=cfg.min_reply_tokens, seed=cfg.seed,
                              dtype=resolve_dtype(cfg.dtype, device))
    block_size = model.config.block_size
    # The shortest conversation: the system prompt and one empty user message.
    shortest = [{"role": "user", "content": ""}]
    try:
        responder.prompt_ids(shortest, cfg.system_prompt)
    except ConversationTooLong:
        n_tokens = len(render_prompt(tokenizer, responder.conversation(shortest, cfg.system_prompt)))
        raise ValueError(f"the system prompt and the chat template take {n_tokens} tokens before the user's first "
                         f"word, which leaves fewer than min_reply_tokens={cfg.min_reply_tokens} of the model's "
                         f"block_size {block_size} for a reply; shorten system_prompt or lower min_reply_tokens") from None

    description = (f"{cfg.checkpoint}: {model.num_parameters() / 1e6:.2f}M parameters, a context of "
                   f"{block_size} tokens, on {device}.")
    with gr.Blocks(title=cfg.title, analytics_enabled=False) as app:
        gr.Markdown(f"## {cfg.title}\n{description}")
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=480, feedback_options=None)
                message = gr.Textbox(show_label=False, placeholder="Type a message and press Enter",
                                     elem_id="message", autofocus=True)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    regenerate = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1):
                system_prompt = gr.Textbox(cfg.system_prompt, label="System prompt", lines=4, elem_id="system-prompt",
                                           placeholder="Optional. Applies from the next reply on.")
                temperature = gr.Slider(0.0, max(2.0, cfg.temperature), value=cfg.temperature, step=0.05,
                                        label="Temperature", info="0 picks the most likely token")
                top_p = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.01, label="Top-p", info="1 turns it off")
                top_k = gr.Slider(0, max(200, cfg.top_k), value=cfg.top_k, step=1, label="Top-k",
                                  info="0 turns it off")
                repetition_penalty = gr.Slider(min(1.0, cfg.repetition_penalty), max(2.0, cfg.repetition_penalty),
                                               value=cfg.repetition_penalty, step=0.05, label="Repetition penalty",
                                               info="1 turns it off")
                max_new_tokens = gr.Slider(1, block_size, value=min(cfg.max_new_tokens, block_size), step=1,
                                           label="Max new tokens")

        generation = dict(fn=responder.respond, inputs=[history, system_prompt, temperature, top_p, top_k,
                                                        repetition_penalty, max_new_tokens],
                          outputs=[history, chatbot], concurrency_limit=cfg.concurrency_limit,
                          concurrency_id="generate")
        submitted = gr.on([message.submit, send.click], responder.add_user_turn, [message, history, system_prompt],
                          [message, history, chatbot], show_progress="hidden").success(**generation)
        regenerated = regenerate.click(responder.drop_last_reply, [history], [history, chatbot],
                                       show_progress="hidden").success(**generation)
        stop.click(None, cancels=[submitted, regenerated])
        # Cancel first, then empty the page, so that no update of the cancelled reply lands after the clearing.
        clear.click(None, cancels=[submitted, regenerated]).then(responder.clear, None, [history, chatbot])
    return app


def start_server(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860) -> str:
    """Serve `app` from a background thread; return the page's URL.

    Port 0 picks a free port. No public share link is ever created, even when the
    GRADIO_SHARE environment variable is set.
    """
    if port == 0:
        # NOTE: another process can take this port before Gradio binds it; Gradio then fails to start.
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    _, url, _ = app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    return url


def load_chat_model(cfg: ChatConfig) -> tuple[GPT, Tokenizer]:
    """Load the checkpoint's model, with the adapter when one is given, and its tokenizer.

    Raises:
        FileNotFoundError: the checkpoint folder or one of its files is missing.
        ValueError: the tokenizer has more tokens than the model, or the adapter folder
            is missing, unreadable or made for another base model.
        NotImplementedError: the adapter uses a PEFT feature other than plain LoRA.
    """
    ckpt_dir = check_checkpoint_dir(cfg.checkpoint)
    device = resolve_device(cfg.device)
    tokenizer = Tokenizer.from_file(ckpt_dir / TOKENIZER_FILE)
    model = load_model(ckpt_dir, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{ckpt_dir / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {model.config.vocab_size}; the tokenizer does not belong to this checkpoint: copy the "
                         f"tokenizer.json the model was trained with into {ckpt_dir}")
    if cfg.adapter is not None:
        # Imported only here because gpt.lora imports peft, which adds seconds to every start.
        from gpt.lora import load_adapter, merge_adapter

        # Merged into the weights, the adapter costs nothing per token and the model stays a plain GPT.
        model = merge_adapter(load_adapter(model, cfg.adapter))
    logger.info("loaded %s%s: %.2fM parameters, block_size %d, on %s", ckpt_dir,
                f" with adapter {cfg.adapter}" if cfg.adapter is not None else "", model.num_parameters() / 1e6,
                model.config.block_size, device)
    return model, tokenizer


def run(cfg: ChatConfig) -> None:
    """Load the checkpoint, serve the chat page on cfg.host:cfg.port and block until Ctrl+C.

    Raises:
        FileNotFoundError: the checkpoint folder or one of its files is missing.
        ValueError: the tokenizer or the adapter does not fit the model, or the system
            prompt leaves no room for a conversation.
        NotImplementedError: the adapter uses a PEFT feature other than plain LoRA.
    """
    # Gradio checks its own server with httpx at launch; its request lines are noise here.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model, tokenizer = load_chat_model(cfg)
    app = build_app(model, tokenizer, cfg)
    url = start_server(app, cfg.host, cfg.port)
    logger.info("chat page at %s (Ctrl+C stops the server)", url)
    if cfg.host not in LOCAL_HOSTS:
        logger.warning("listening on %s: anyone who can reach this address can use the model, and there is no login",
                       cfg.host)
    try:
        app.block_thread()
    finally:
        app.close(verbose=False)
        logger.info("chat server stopped")
