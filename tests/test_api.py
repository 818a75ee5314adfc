"""Tests of the `serve` stage (serve/api.py): a real uvicorn server on 127.0.0.1 in a
background thread, driven by the `openai` client and by httpx.

The model is a tiny random GPT whose logits are shifted so that it only produces tokens
of printable ASCII text (`ReadableGPT`): every output is readable, so the stop-string
cases can be built from real outputs. The tokenizer is trained on the first 8 KB of
tiny-shakespeare from GPTLAB_DATA_DIR. Expected outputs come from gpt.generate run on
the same model, so every reply is checked against the engine itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from gpt.chat import render_prompt, stop_token_ids
from gpt.checkpoint import TOKENIZER_FILE, save_model
from gpt.config import ConfigError, build_config
from gpt.generate import Completion, SamplingParams, generate
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer
from serve.api import ServeConfig, create_app

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-test"
BLOCK_SIZE = 128
HELLO = [{"role": "user", "content": "Good morrow, who goes there?"}]


class ReadableGPT(GPT):
    """A random GPT that only samples tokens of printable ASCII text, plus `favored` ids
    whose logits are raised above all others. `delay_s` slows every forward pass down,
    and `n_forward` counts them."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, favored: tuple[int, ...] = (),
                 delay_s: float = 0.0) -> None:
        super().__init__(config)
        bias = torch.full((config.vocab_size,), -1e4)
        for token_id in range(len(SPECIAL_TOKENS), tokenizer.vocab_size):
            if all(32 <= byte < 127 for byte in tokenizer.token_bytes(token_id)):
                bias[token_id] = 0.0
        bias[list(favored)] = 1e4
        self.register_buffer("logit_bias", bias, persistent=False)
        self.delay_s = delay_s
        self.n_forward = 0

    def forward(self, idx, targets=None, **kwargs):
        self.n_forward += 1
        time.sleep(self.delay_s)
        out = super().forward(idx, targets, **kwargs)
        return out if out.logits is None else out._replace(logits=out.logits + self.logit_bias)


class FailingGPT(ReadableGPT):
    """A ReadableGPT whose forward pass number `fail_at` (counting from 1) raises RuntimeError."""

    fail_at: int | None = None

    def forward(self, idx, targets=None, **kwargs):
        if self.n_forward + 1 == self.fail_at:
            self.n_forward += 1
            raise RuntimeError("simulated device failure")
        return super().forward(idx, targets, **kwargs)


@contextlib.contextmanager
def serving(model: GPT, tokenizer: Tokenizer, **settings) -> Iterator[tuple[str, object]]:
    """Run the API for `model` on a free port of 127.0.0.1; yield (base URL, app)."""
    cfg = ServeConfig(checkpoint=Path("unused"), model_name=MODEL, **settings)
    app = create_app(model, tokenizer, cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    sock = server.config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "the test server thread ended before it started serving"
        assert time.monotonic() < deadline, "the test server did not start within 20 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    data_dir = os.environ.get("GPTLAB_DATA_DIR")
    if not data_dir:
        pytest.skip("GPTLAB_DATA_DIR is not set; point it at the data kit to train the test tokenizer on real text")
    text = (Path(data_dir) / "pretrain" / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:8000]
    return Tokenizer.train([text[i:i + 1000] for i in range(0, len(text), 1000)], vocab_size=400)


def tiny_config(tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig.from_layout("gpt2", vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_embd=32,
                                   block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return ReadableGPT(tiny_config(tokenizer), tokenizer).eval()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    with serving(model, tokenizer) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def engine(model, tokenizer, prompt: list[int], n: int = 1, **settings) -> list[Completion]:
    params = SamplingParams(**{"temperature": 0.0, **settings})
    return generate(model, [prompt] * n, params, tokenizer=tokenizer)


def chat_prompt(tokenizer, messages=HELLO) -> list[int]:
    return render_prompt(tokenizer, messages)


def text_prompt(tokenizer, text: str) -> list[int]:
    return [tokenizer.eot_id] + tokenizer.encode(text)


# ---------------------------------------------------------------------------
# Replies


def test_models_lists_model(client):
    assert [card.id for card in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_matches_engine(client, model, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=20)
    expected = engine(model, tokenizer, chat_prompt(tokenizer), max_new_tokens=20,
                      stop_token_ids=stop_token_ids(tokenizer))[0]
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason


def test_usage_counts_tokens(client, model, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=12)
    expected = engine(model, tokenizer, chat_prompt(tokenizer), max_new_tokens=12,
                      stop_token_ids=stop_token_ids(tokenizer))[0]
    assert reply.usage.prompt_tokens == len(chat_prompt(tokenizer))
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_equals_whole(client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    choice_chunks = [chunk for chunk in chunks if chunk.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in choice_chunks) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in choice_chunks if c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stream_without_usage_has_none(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=4,
                                                 stream=True))
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_ends_with_done(base_url):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_completion_matches_engine(client, model, tokenizer):
    reply = client.completions.create(model=MODEL, prompt="ROMEO:", temperature=0, max_tokens=20)
    expected = engine(model, tokenizer, text_prompt(tokenizer, "ROMEO:"), max_new_tokens=20)[0]
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == len(text_prompt(tokenizer, "ROMEO:"))
    assert reply.usage.completion_tokens == 20


def test_completion_default_max_tokens(client):
    reply = client.completions.create(model=MODEL, prompt="ROMEO:", temperature=0)
    assert reply.usage.completion_tokens == 16
    assert reply.choices[0].finish_reason == "length"


def test_completion_stream_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt=["To be", "or not"], temperature=0, max_tokens=10)
    pieces = {0: "", 1: ""}
    for chunk in client.completions.create(model=MODEL, prompt=["To be", "or not"], temperature=0, max_tokens=10,
                                           stream=True):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert pieces == {choice.index: choice.text for choice in whole.choices}


def test_completion_token_prompt(client, model, tokenizer):
    prompt = text_prompt(tokenizer, "KING:")
    reply = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    assert reply.choices[0].text == engine(model, tokenizer, prompt, max_new_tokens=8)[0].text


def test_max_tokens_gives_length(client):
    for field in ("max_tokens", "max_completion_tokens"):
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0.8, seed=3, **{field: 7})
        assert reply.choices[0].finish_reason == "length", field
        assert reply.usage.completion_tokens == 7, field


def test_stop_token_ends_reply(tokenizer):
    """A model that always emits <|end|> ends a chat reply at once, with finish_reason "stop"."""
    torch.manual_seed(0)
    end_first = ReadableGPT(tiny_config(tokenizer), tokenizer, favored=(tokenizer.special_id("<|end|>"),)).eval()
    with serving(end_first, tokenizer) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=HELLO)
    assert reply.choices[0].message.content == ""
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 1


# ---------------------------------------------------------------------------
# Stop strings


def spanning_stop_string(model, tokenizer, prompt: list[int]) -> tuple[str, str]:
    """Find a stop string that crosses a token boundary where it first occurs in the greedy output.

    Returns:
        (stop string, full greedy output without stop strings).
    """
    output = engine(model, tokenizer, prompt, max_new_tokens=40)[0]
    pieces = [tokenizer.decode([token]) for token in output.tokens]
    assert "".join(pieces) == output.text  # every token is printable ASCII, so pieces align with the text
    boundaries, end = set(), 0
    for piece in pieces:
        end += len(piece)
        boundaries.add(end)
    for k in range(3, len(pieces) - 1):
        if len(pieces[k]) < 1 or len(pieces[k + 1]) < 1:
            continue
        stop = pieces[k][-2:] + pieces[k + 1][:2]
        first = output.text.index(stop)
        if any(first < boundary < first + len(stop) for boundary in boundaries):
            return stop, output.text
    pytest.fail(f"no stop string crossing a token boundary in {pieces}")


def test_stop_string_across_tokens(client, model, tokenizer):
    stop, full = spanning_stop_string(model, tokenizer, text_prompt(tokenizer, "ROMEO:"))
    reply = client.completions.create(model=MODEL, prompt="ROMEO:", temperature=0, max_tokens=40, stop=stop)
    assert reply.choices[0].text == full[:full.index(stop)]
    assert stop not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


def test_stop_string_never_streamed(client, model, tokenizer):
    stop, full = spanning_stop_string(model, tokenizer, chat_prompt(tokenizer))
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0, max_tokens=40,
                                                 stop=[stop, "never-there"], stream=True))
    pieces = [chunk.choices[0].delta.content or "" for chunk in chunks]
    assert "".join(pieces) == full[:full.index(stop)]
    assert all(stop not in piece for piece in pieces)
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------
# Seeds and several choices


def test_seed_reproducible(client):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=1.0, max_tokens=20, seed=seed)
        return reply.choices[0].message.content

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_seeded_choices_match_engine(client, model, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0.9, top_p=0.9, max_tokens=15,
                                           seed=11, n=2, extra_body={"top_k": 40})
    expected = engine(model, tokenizer, chat_prompt(tokenizer), n=2, temperature=0.9, top_p=0.9, top_k=40,
                      max_new_tokens=15, seed=11, stop_token_ids=stop_token_ids(tokenizer))
    assert [choice.index for choice in reply.choices] == [0, 1]
    assert [choice.message.content for choice in reply.choices] == [c.text for c in expected]
    assert reply.choices[0].message.content != reply.choices[1].message.content


def test_n_usage_sums_choices(client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=1.0, max_tokens=6, n=2,
                                           extra_body={"repetition_penalty": 1.3})
    assert len(reply.choices) == 2
    assert reply.usage.prompt_tokens == len(chat_prompt(tokenizer))
    assert reply.usage.completion_tokens == 12


def test_completion_choice_order(client, model, tokenizer):
    reply = client.completions.create(model=MODEL, prompt=["To be", "or not"], temperature=0, max_tokens=5, n=2)
    expected = [engine(model, tokenizer, text_prompt(tokenizer, text), max_new_tokens=5)[0].text
                for text in ("To be", "or not")]
    assert [choice.text for choice in reply.choices] == [expected[0], expected[0], expected[1], expected[1]]
    assert reply.usage.prompt_tokens == sum(len(text_prompt(tokenizer, text)) for text in ("To be", "or not"))


# ---------------------------------------------------------------------------
# Invalid requests


CHAT_400 = [
    ("missing messages", {"model": MODEL}, "messages"),
    ("messages wrong type", {"model": MODEL, "messages": "hello"}, "messages"),
    ("temperature out of range", {"model": MODEL, "messages": HELLO, "temperature": 3}, "temperature"),
    ("temperature wrong type", {"model": MODEL, "messages": HELLO, "temperature": "hot"}, "temperature"),
    ("max_tokens zero", {"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("too many stops", {"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("unsupported tools", {"model": MODEL, "messages": HELLO, "tools": []}, "tools"),
    ("too long prompt", {"model": MODEL, "messages": [{"role": "user", "content": "to be " * 200}]}, "messages"),
]


@pytest.mark.parametrize("body, param", [case[1:] for case in CHAT_400], ids=[case[0] for case in CHAT_400])
def test_invalid_chat_gets_400(base_url, body, param):
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)
    error = response.json()["error"]
    assert response.status_code == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"] or "context length" in error["message"]


def test_invalid_json_gets_400(base_url):
    response = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=2.5)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="to be " * 200)
    assert info.value.code == "context_length_exceeded"


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)


def test_unexpected_error_gets_500(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("serve.api.completion_prompts", broken)
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=2)
    monkeypatch.undo()
    assert info.value.status_code == 500
    assert info.value.body["type"] == "server_error"
    assert "simulated bug" in info.value.body["message"]
    assert client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=2).usage.completion_tokens == 2


def test_api_key_required(model, tokenizer):
    with serving(model, tokenizer, api_key="sesame") as (url, _):
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        bare = httpx.get(f"{url}/v1/models", timeout=60)
        reply = right.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert bare.status_code == 401
    assert bare.json()["error"]["code"] == "invalid_api_key"
    assert reply.usage.completion_tokens == 2


def test_config_problems():
    with pytest.raises(ConfigError, match="max_batch_size") as info:
        build_config(ServeConfig, overrides=[("checkpoint", "x"), ("max_batch_size", "0"), ("port", "70000")])
    assert "port" in str(info.value)


# ---------------------------------------------------------------------------
# Concurrency


def stream_text(url: str, messages, max_tokens: int) -> tuple[str, str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    text, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                max_tokens=max_tokens, stream=True):
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_concurrent_streams_match_alone(server, client):
    url, app = server
    conversations = [[{"role": "user", "content": f"Speak, friend number {i}" + " and more" * i}] for i in range(8)]
    alone = [client.chat.completions.create(model=MODEL, messages=m, temperature=0, max_tokens=24).choices[0]
             for m in conversations]
    results: list[tuple[str, str] | None] = [None] * 8

    def worker(i: int) -> None:
        results[i] = stream_text(url, conversations[i], 24)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [(choice.message.content, choice.finish_reason) for choice in alone]
    assert app.state.worker.peak_rows > 1


def test_disconnect_frees_slot(tokenizer):
    torch.manual_seed(0)
    slow = ReadableGPT(tiny_config(tokenizer), tokenizer, delay_s=0.03).eval()
    with serving(slow, tokenizer, max_batch_size=1) as (url, app):
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            events = response.iter_lines()
            received = [line for _, line in zip(range(6), events)]
        assert any(line.startswith("data: {") for line in received)
        deadline = time.monotonic() + 10
        while app.state.worker.active_rows and time.monotonic() < deadline:
            time.sleep(0.01)
        passes_at_release = slow.n_forward
        assert app.state.worker.active_rows == 0
        assert passes_at_release < 60  # the 100-token reply would need over 100 passes

        start = time.monotonic()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
        assert reply.usage.completion_tokens == 3
        assert time.monotonic() - start < 0.03 * 60  # it did not wait for the abandoned reply


def test_disconnect_in_shared_batch(tokenizer):
    """Two requests with the same settings share a batch; the one left alone still gets its whole reply."""
    torch.manual_seed(0)
    slow = ReadableGPT(tiny_config(tokenizer), tokenizer, delay_s=0.01).eval()
    expected = engine(slow, tokenizer, chat_prompt(tokenizer), max_new_tokens=30,
                      stop_token_ids=stop_token_ids(tokenizer))[0]
    # A long batch window, so that both requests surely start together.
    with serving(slow, tokenizer, batch_wait_ms=500) as (url, app):
        result = []
        survivor = threading.Thread(target=lambda: result.append(stream_text(url, HELLO, 30)))
        survivor.start()
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 30, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            received = [line for _, line in zip(range(4), response.iter_lines())]
        survivor.join(timeout=60)
        assert app.state.worker.peak_rows == 2
    assert any(line.startswith("data: {") for line in received)
    assert result == [(expected.text, expected.finish_reason)]


def test_generation_error_keeps_serving(tokenizer):
    torch.manual_seed(0)
    failing = FailingGPT(tiny_config(tokenizer), tokenizer).eval()
    with serving(failing, tokenizer) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        failing.fail_at = failing.n_forward + 3
        with pytest.raises(openai.InternalServerError, match="simulated device failure"):
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10)

        failing.fail_at = failing.n_forward + 3
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 10, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3)
    assert '"type": "server_error"' in lines[-1]
    assert reply.usage.completion_tokens == 3


# ---------------------------------------------------------------------------
# The command


def test_serve_command_with_ui(tmp_path, tokenizer):
    torch.manual_seed(0)
    tokenizer_file = tmp_path / TOKENIZER_FILE
    tokenizer.save(tokenizer_file)
    save_model(GPT(tiny_config(tokenizer)), tmp_path / "ckpt", tokenizer_file=tokenizer_file)
    command = [sys.executable, "-m", "gptlab", "serve", "--checkpoint", str(tmp_path / "ckpt"), "--port", "0",
               "--ui", "--model_name", MODEL]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in process.stderr:
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if match:
                url = match.group(1)
                break
        assert url is not None, "gptlab serve printed no address"
        deadline = time.monotonic() + 30
        while True:
            try:
                models = httpx.get(f"{url}/v1/models", timeout=10)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "gptlab serve did not accept connections"
                time.sleep(0.1)
        page = httpx.get(f"{url}/ui/", timeout=30, follow_redirects=True)
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                           json={"model": MODEL, "messages": HELLO, "max_tokens": 2})
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert models.json()["data"][0]["id"] == MODEL
    assert page.status_code == 200
    assert "<html" in page.text.lower()
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
