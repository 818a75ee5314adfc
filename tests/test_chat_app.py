"""Tests of the `chat` stage (serve/chat_app.py): the reply handlers on a tiny random
GPT with a tokenizer trained on the first 8 KB of tiny-shakespeare from GPTLAB_DATA_DIR,
and the whole page, started with `gptlab chat` and driven by headless Chromium.

The browser test needs Debian's `chromium` at /usr/bin/chromium and the `playwright`
package; it never downloads a browser and sends no request beyond 127.0.0.1.
"""

from __future__ import annotations

import copy
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import gradio as gr
import pytest
import torch

from gpt.chat import END_OF_TURN, render_prompt, stop_token_ids
from gpt.checkpoint import TOKENIZER_FILE, save_model
from gpt.config import ConfigError, build_config
from gpt.lora import add_lora, merge_adapter, save_adapter
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from serve import chat_app
from serve.chat_app import ChatConfig, ChatResponder, ConversationTooLong, build_app, load_chat_model, to_chatbot

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Playwright's headless=True adds --headless; these are the other flags.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
BLOCK_SIZE = 128
# The page's initial settings: seeded sampling, so every reply is reproducible.
SETTINGS = dict(temperature=0.7, top_p=0.95, top_k=50, repetition_penalty=1.1, max_new_tokens=24)

HISTORY = [
    {"role": "user", "content": "Good morrow, who goes there?"},
    {"role": "assistant", "content": "  A friend, my lord."},
    {"role": "user", "content": "What news from Padua?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    data_dir = os.environ.get("GPTLAB_DATA_DIR")
    if not data_dir:
        pytest.skip("GPTLAB_DATA_DIR is not set; point it at the data kit to train the test tokenizer on real text")
    text = (Path(data_dir) / "pretrain" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:8000]
    return Tokenizer.train([text[i:i + 1000] for i in range(0, len(text), 1000)], vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig.from_layout("gpt2", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=32,
                                     block_size=BLOCK_SIZE)
    return GPT(config).eval()


@pytest.fixture
def responder(model, tokenizer) -> ChatResponder:
    return ChatResponder(model, tokenizer, min_reply_tokens=16, seed=0)


def respond_all(responder: ChatResponder, history, system_prompt: str = "", **settings) -> list[str]:
    """Run `respond` to the end; return the assistant text of every update."""
    values = {**SETTINGS, **settings}
    updates = []
    for new_history, _ in responder.respond(history, system_prompt, values["temperature"], values["top_p"],
                                            values["top_k"], values["repetition_penalty"], values["max_new_tokens"]):
        updates.append(new_history[-1]["content"])
    return updates


class ScriptedReplyGPT(GPT):
    """A real GPT whose logits are overwritten so that, after any prompt, it generates
    `reply_ids` one by one and then repeats the last id. It counts its calls, so it serves
    one generation at a time."""

    def __init__(self, config: ModelConfig, reply_ids: list[int]) -> None:
        super().__init__(config)
        self.reply_ids = reply_ids
        self.n_sampled = 0

    def forward(self, idx, targets=None, **kwargs):
        out = super().forward(idx, targets, **kwargs)
        if out.logits is None:
            return out
        token = self.reply_ids[min(self.n_sampled, len(self.reply_ids) - 1)]
        self.n_sampled += 1
        logits = torch.full_like(out.logits, -10.0)
        logits[..., token] = 10.0
        return out._replace(logits=logits)


def scripted_responder(tokenizer: Tokenizer, reply_ids: list[int]) -> ChatResponder:
    config = ModelConfig.from_layout("gpt2", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                                     block_size=BLOCK_SIZE)
    return ChatResponder(ScriptedReplyGPT(config, reply_ids), tokenizer, seed=0)


# ---------------------------------------------------------------------------
# Replies


def test_reply_streams_prefixes(responder):
    updates = respond_all(responder, HISTORY)
    assert len(updates) > 1
    assert updates[-1] != ""
    for update in updates:
        assert updates[-1].startswith(update)


def test_reply_keeps_earlier_turns(responder):
    *_, (new_history, chatbot) = responder.respond(HISTORY, "", *SETTINGS.values())
    assert new_history[:-1] == HISTORY
    assert new_history[-1]["role"] == "assistant"
    assert len(chatbot) == len(HISTORY) + 1


@pytest.mark.parametrize("system_prompt", ["", "You speak as a Shakespearean herald."])
def test_prompt_is_rendered_history(responder, tokenizer, monkeypatch, system_prompt):
    calls = []
    real_stream = chat_app.stream

    def recording_stream(model, tokenizer, prompt_ids, params, **kwargs):
        calls.append((list(prompt_ids), params))
        return real_stream(model, tokenizer, prompt_ids, params, **kwargs)

    monkeypatch.setattr(chat_app, "stream", recording_stream)
    respond_all(responder, HISTORY, system_prompt)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    (prompt, params), = calls
    assert prompt == render_prompt(tokenizer, system + HISTORY)
    assert params.stop_token_ids == stop_token_ids(tokenizer)


def test_reply_ends_at_end_of_turn(tokenizer):
    text_ids = tokenizer.encode("Fair sir, 🚀 café!")
    end = tokenizer.special_id(END_OF_TURN)
    responder = scripted_responder(tokenizer, text_ids + [end] + tokenizer.encode(" and more"))
    updates = respond_all(responder, HISTORY, max_new_tokens=40)
    assert updates[-1] == "Fair sir, 🚀 café!"


def test_reply_never_splits_a_character(tokenizer):
    # The tokenizer never saw an emoji, so each one is four byte tokens.
    text = "🚀🌙 é"
    text_ids = tokenizer.encode(text)
    assert len(text_ids) > len(text)
    responder = scripted_responder(tokenizer, text_ids + [tokenizer.special_id(END_OF_TURN)])
    updates = respond_all(responder, HISTORY)
    assert updates[-1] == text
    for update in updates:
        assert "\ufffd" not in update
        assert text.startswith(update)


def test_empty_reply_shown_as_note(tokenizer):
    responder = scripted_responder(tokenizer, [tokenizer.special_id(END_OF_TURN)])
    *_, (new_history, chatbot) = responder.respond(HISTORY, "", *SETTINGS.values())
    assert new_history[-1] == {"role": "assistant", "content": ""}
    assert chatbot[-1]["content"][0]["text"] == chat_app.EMPTY_REPLY_TEXT


def test_stop_ends_generation(responder, monkeypatch):
    streams = []
    real_stream = chat_app.stream

    def recording_stream(*args, **kwargs):
        streams.append(real_stream(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(chat_app, "stream", recording_stream)
    run = responder.respond(HISTORY, "", *SETTINGS.values())
    next(run)
    run.close()  # what Gradio's Stop does to a running generator
    (text_stream,) = streams
    assert text_stream.finish_reason is None
    assert len(text_stream.tokens) < SETTINGS["max_new_tokens"]
    assert list(text_stream) == []


def test_chatbot_keeps_leading_spaces():
    # Gradio strips plain string content with inspect.cleandoc; text parts pass unchanged.
    value = gr.Chatbot().postprocess(to_chatbot(HISTORY))
    assert value.root[1].content[0].text == "  A friend, my lord."


# ---------------------------------------------------------------------------
# Turns, regenerate, clear


def test_add_user_turn(responder):
    textbox, history, chatbot = responder.add_user_turn("Hail!", HISTORY[:2], "")
    assert textbox == ""
    assert history == HISTORY[:2] + [{"role": "user", "content": "Hail!"}]
    assert len(chatbot) == 3


def test_blank_message_is_not_sent(responder):
    # Outside a running page, gr.Warning becomes a Python warning.
    with pytest.warns(UserWarning, match="Type a message first"):
        textbox, history, _ = responder.add_user_turn("   ", HISTORY[:2], "")
    assert textbox == "   "
    assert history == HISTORY[:2]
    assert respond_all(responder, history) == []


def test_regenerate_answers_same_message(responder):
    first = respond_all(responder, HISTORY)[-1]
    history, _ = responder.drop_last_reply(HISTORY + [{"role": "assistant", "content": first}])
    assert history == HISTORY
    # The responder's seed is fixed, so the same conversation gets the same reply.
    assert respond_all(responder, history)[-1] == first


def test_clear_empties_conversation(responder):
    assert responder.clear() == ([], [])


# ---------------------------------------------------------------------------
# A conversation longer than the context


def long_history(length: int = 400) -> list[dict]:
    return [{"role": "user", "content": "Now is the winter of our discontent " * (length // 7)}]


def test_long_message_rejected(responder):
    with pytest.raises(gr.Error, match="Press Clear"):
        responder.add_user_turn(long_history()[0]["content"], [], "")


def test_long_conversation_reply_rejected(responder):
    with pytest.raises(gr.Error, match="block_size"):
        respond_all(responder, long_history())


def test_fit_boundary(model, tokenizer):
    n_prompt = len(render_prompt(tokenizer, HISTORY))
    fits = ChatResponder(model, tokenizer, min_reply_tokens=BLOCK_SIZE - n_prompt)
    assert fits.prompt_ids(HISTORY, "") == render_prompt(tokenizer, HISTORY)
    too_long = ChatResponder(model, tokenizer, min_reply_tokens=BLOCK_SIZE - n_prompt + 1)
    with pytest.raises(ConversationTooLong, match=f"leaves {BLOCK_SIZE - n_prompt} tokens"):
        too_long.prompt_ids(HISTORY, "")


def test_invalid_setting_rejected(responder):
    with pytest.raises(gr.Error, match="top_p"):
        respond_all(responder, HISTORY, top_p=0.0)


# ---------------------------------------------------------------------------
# Several sessions at once

SESSION_B = [{"role": "user", "content": "Sing me a song of the sea."}]


def test_sessions_interleaved(responder):
    alone_a = respond_all(responder, HISTORY)
    alone_b = respond_all(responder, SESSION_B)
    assert alone_a[-1] != alone_b[-1]
    # Advance the two generations turn about, so each decode step runs between steps of the other.
    runs = [responder.respond(history, "", *SETTINGS.values()) for history in (HISTORY, SESSION_B)]
    updates = [[], []]
    active = [0, 1]
    while active:
        for session in list(active):
            try:
                updates[session].append(next(runs[session])[0][-1]["content"])
            except StopIteration:
                active.remove(session)
    assert updates[0] == alone_a
    assert updates[1] == alone_b


def test_sessions_in_threads(responder):
    expected = [respond_all(responder, history)[-1] for history in (HISTORY, SESSION_B)]
    results = [None, None]
    barrier = threading.Barrier(2)

    def chat(session: int, history) -> None:
        barrier.wait()
        results[session] = respond_all(responder, history)[-1]

    threads = [threading.Thread(target=chat, args=(i, h)) for i, h in enumerate((HISTORY, SESSION_B))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == expected


# ---------------------------------------------------------------------------
# Config, app and loading


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("chat") / "sft"
    tokenizer_file = folder.parent / TOKENIZER_FILE
    tokenizer.save(tokenizer_file)
    save_model(model, folder, tokenizer_file=tokenizer_file)
    return folder


def test_config_has_no_share(checkpoint):
    with pytest.raises(ConfigError, match="share"):
        build_config(ChatConfig, overrides=[("checkpoint", str(checkpoint)), ("share", "true")])


def test_config_problems(checkpoint):
    cfg = ChatConfig(checkpoint=checkpoint, port=70000, top_p=0.0, min_reply_tokens=0, concurrency_limit=0)
    problems = " ".join(cfg.problems())
    for field_name in ("port", "top_p", "min_reply_tokens", "concurrency_limit"):
        assert field_name in problems


def test_build_app(model, tokenizer, checkpoint):
    app = build_app(model, tokenizer, ChatConfig(checkpoint=checkpoint))
    assert isinstance(app, gr.Blocks)


def test_long_system_prompt_rejected(model, tokenizer, checkpoint):
    cfg = ChatConfig(checkpoint=checkpoint, system_prompt="Speak thou in verse. " * 40)
    with pytest.raises(ValueError, match="shorten system_prompt"):
        build_app(model, tokenizer, cfg)


def test_load_chat_model(checkpoint, model):
    loaded, tokenizer = load_chat_model(ChatConfig(checkpoint=checkpoint, device="cpu"))
    assert tokenizer.vocab_size == model.config.vocab_size
    assert torch.equal(loaded.wte.weight, model.wte.weight)


def test_load_chat_model_with_adapter(checkpoint, model, tmp_path):
    adapted = add_lora(copy.deepcopy(model), r=2, alpha=4, dropout=0.0, targets="q_proj,v_proj")
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    save_adapter(adapted, tmp_path / "adapter", base_checkpoint=checkpoint)
    expected = merge_adapter(adapted)
    loaded, _ = load_chat_model(ChatConfig(checkpoint=checkpoint, device="cpu", adapter=tmp_path / "adapter"))
    assert isinstance(loaded, GPT)
    assert torch.allclose(loaded.blocks[0].attn.q_proj.weight, expected.blocks[0].attn.q_proj.weight, atol=1e-6)
    assert not torch.allclose(loaded.blocks[0].attn.q_proj.weight, model.blocks[0].attn.q_proj.weight)


# ---------------------------------------------------------------------------
# The page in a browser


def start_chat_server(checkpoint: Path) -> tuple[subprocess.Popen, str, queue.Queue]:
    """Start `gptlab chat` on a free port of 127.0.0.1; return the process, its URL and its log lines."""
    command = [sys.executable, "-m", "gptlab", "chat", f"checkpoint={checkpoint}", "port=0", "seed=0",
               "max_new_tokens=24", "device=cpu"]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    deadline = time.monotonic() + 60
    log = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if process.poll() is not None:
                break
            continue
        log.append(line)
        found = re.search(r"chat page at (http://127\.0\.0\.1:\d+/)", line)
        if found:
            return process, found.group(1), lines
    process.kill()
    raise AssertionError("gptlab chat did not report its URL within 60 s; its log:\n" + "".join(log))


def wait_for_reply_log(lines: queue.Queue, timeout: float = 30) -> str:
    """Return the server's next "reply:" log line, which it writes when a reply is finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if " reply: " in line:
            return line
    raise AssertionError(f"the server logged no finished reply within {timeout} s")


def test_chat_in_browser(checkpoint, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

    process, url, lines = start_chat_server(checkpoint)
    outside_requests = []

    def record_outside(request) -> None:
        if urlparse(request.url).hostname != "127.0.0.1":
            outside_requests.append(request.url)

    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
            # Observed, not intercepted: Playwright's request interception holds back
            # Gradio's server-sent events until the stream ends.
            browser.on("request", record_outside)
            page = browser.new_page()
            page.goto(url)

            page.locator("#message textarea").fill("Good morrow, who goes there?")
            page.locator("#send").click()
            reply_log = wait_for_reply_log(lines)
            bot = page.locator("#chatbot [data-testid='bot']")
            sync_api.expect(bot).to_have_count(1)
            screenshot = tmp_path / "chat.png"
            page.screenshot(path=screenshot)
            reply = bot.inner_text()
            user = page.locator("#chatbot [data-testid='user']").inner_text()

            # A second tab has a conversation of its own.
            other = browser.new_page()
            other.goto(url)
            other.locator("#message textarea").fill("Sing me a song of the sea.")
            other.locator("#send").click()
            wait_for_reply_log(lines)
            sync_api.expect(other.locator("#chatbot [data-testid='bot']")).to_have_count(1)
            other_user = other.locator("#chatbot [data-testid='user']").inner_text()
            first_tab_bots = bot.count()

            # A message longer than the context is rejected with a notice, not a traceback.
            page.locator("#message textarea").fill("Now is the winter of our discontent " * 60)
            page.locator("#send").click()
            sync_api.expect(page.get_by_text("Press Clear").first).to_be_visible()
            tracebacks = page.get_by_text("Traceback").count()
            browser.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()

    assert "finish reason" in reply_log
    assert reply.strip() != ""
    assert user == "Good morrow, who goes there?"
    assert other_user == "Sing me a song of the sea."
    assert first_tab_bots == 1
    assert tracebacks == 0
    assert screenshot.stat().st_size > 0
    assert outside_requests == []
