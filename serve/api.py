"""The `serve` stage: an OpenAI-compatible HTTP API on the generation engine of gpt/generate.py.

    gptlab serve --checkpoint runs/NAME/sft [--adapter DIR] [--port 8000] [--api_key KEY] [--ui]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models and
GET /v1/models/{model}, with OpenAI's request fields and response shapes, streamed as
server-sent events (`data: {...}` chunks, then `data: [DONE]`) when `stream` is true.
Chat prompts are rendered by the chat template of gpt/chat.py and end at `<|end|>`.
Text completions start a new document, so the prompt follows `<|endoftext|>`, as
in `gptlab sample`, and they end at the next `<|endoftext|>`.

Scheduling: one worker thread owns the model. Requests wait in a queue; between two
decoding steps the worker starts the waiting ones. Requests with the same sampling
settings start together as one batch through `generate_steps`, and the worker
advances all running batches in turn, one token each. A batch cannot take new rows
once it has started, because the engine's batch is fixed at prefill. Rows of one
batch share one SamplingParams, so requests with different settings, and each
seeded sampling request, which must get the same text whatever else is running,
start batches of their own. A client that disconnects cancels its request. Its
batch is closed when no other request shares it; otherwise its rows keep decoding
until the batch ends and their tokens are dropped.

Differences from OpenAI: `max_tokens` larger than the room left in the model's
block_size is accepted and the reply ends there with finish_reason "length" (OpenAI
rejects it). `top_p` 0 means greedy decoding. `top_k` and `repetition_penalty` are
accepted as extra fields. Logprobs, tools, response formats other than text, and
presence or frequency penalties other than 0 are rejected with HTTP 400. A request
naming another model gets 404 `model_not_found`, as OpenAI does.

Security: the server listens on 127.0.0.1 unless `host` says otherwise. `api_key`
protects /v1 only: the chat page mounted at /ui by `--ui` has no login.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.chat import render_prompt, stop_token_ids
from gpt.config import option
from gpt.device import resolve_dtype
from gpt.generate import SamplingParams, StepOutput, generate_steps
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

API_KEY_ENV = "GPTLAB_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_STOP_STRINGS = 4  # OpenAI's limit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still connected


@dataclass
class ServeConfig:
    """Settings of `gptlab serve`."""

    checkpoint: Path = dataclasses.field(metadata={"help": "checkpoint folder to serve (model.safetensors, model.json, tokenizer.json), for example runs/NAME/sft"})
    adapter: Path | None = option(None, "LoRA adapter folder in PEFT format, merged into the checkpoint's weights at load; none serves the checkpoint alone")
    host: str = option("127.0.0.1", "address the server listens on; 127.0.0.1 keeps it on this machine, 0.0.0.0 opens it to the network")
    port: int = option(8000, "TCP port; 0 picks a free port")
    api_key: str | None = option(None, f"key that requests must send as 'Authorization: Bearer KEY'; none reads the environment variable {API_KEY_ENV}, and without either every request is accepted")
    model_name: str | None = option(None, "model id shown by /v1/models and expected in requests; none uses the checkpoint path as given")
    ui: bool = option(False, "also serve the Gradio chat page at /ui, in the same process (without a login, even with api_key)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device to run on: auto picks cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "weight, KV-cache and compute dtype: auto is float32 on a CPU and bfloat16 on a GPU that supports it")
    max_batch_size: int = option(16, "maximum number of sequences decoded at once, over all running batches; a request needs n rows per prompt and waits until they fit")
    batch_wait_ms: float = option(5.0, "milliseconds an idle worker waits after the first request arrives, so that requests sent together start as one batch")

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.port <= 65535:
            found.append(f"port must be in 0..65535 (0 picks a free port), got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            found.append("api_key is empty; give a non-empty key, or none to accept every request")
        if self.model_name is not None and not self.model_name.strip():
            found.append("model_name is empty; give a name, or none to use the checkpoint path")
        if self.max_batch_size < 1:
            found.append(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if not self.batch_wait_ms >= 0:
            found.append(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        return found


# ---------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error sent as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_code(error_type: str) -> str:
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type == "extra_forbidden":
        return "unknown_parameter"
    if error_type.startswith("json_"):
        return "invalid_json"
    if error_type.endswith(("_type", "_parsing")) or error_type in ("literal_error", "model_attributes_type"):
        return "invalid_type"
    return "invalid_value"


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn FastAPI's validation errors into one 400 APIError that lists them all."""
    parts = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"] if part != "body"]
        name = ".".join(location) or "body"
        if error["type"] == "extra_forbidden":
            parts.append(f"unknown parameter '{name}': this server does not know or implement it")
        elif error["type"] == "missing":
            parts.append(f"missing required parameter '{name}'")
        elif error["type"].startswith("json_"):
            parts.append(f"the request body is not valid JSON: {error['msg']}")
        elif name == "body":
            parts.append("the request body must be a JSON object sent with 'Content-Type: application/json'")
        else:
            parts.append(f"invalid value for '{name}': {error['msg']} (got {error.get('input')!r:.80})")
    first = exc.errors()[0] if exc.errors() else {"loc": (), "type": "invalid"}
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    return APIError(400, "; ".join(parts) or "invalid request", param=param, code=_validation_code(first["type"]))


class _UnexpectedErrors:
    """ASGI middleware that logs an unexpected exception and returns 500 with an OpenAI error body.

    A FastAPI handler for `Exception` would return the same response, but Starlette then
    re-raises the exception and uvicorn closes the connection under the client.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.exception("unexpected error in %s %s", scope["method"], scope["path"])
            if started:
                raise
            error = APIError(500, f"internal server error: {type(exc).__name__}: {exc}", kind="server_error")
            await error.response()(scope, receive, send)


# ---------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    # Unknown fields are rejected, as OpenAI does, and strings are not read as numbers.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Clients echo back fields such as `refusal` on assistant messages, so extra fields are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is OpenAI's newer name for the system role.
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """Fields shared by both endpoints; None (or absent) takes OpenAI's default."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**64)  # the range torch.Generator.manual_seed takes
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # a count of top tokens in this endpoint


def sampling_params(request: SamplingRequest, max_tokens: int | None, stop_ids: list[int],
                    block_size: int) -> SamplingParams:
    """Build the engine's SamplingParams from a request, normalized so that requests that
    decode alike compare equal (see `batch_key`).

    Raises:
        APIError: 400 for a setting the engine rejects or this server does not implement.
    """
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise APIError(400, f"{name} is not supported; use repetition_penalty (above 1 discourages repeats)",
                           param=name, code="unsupported_parameter")
    if request.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    if any(not text for text in stop):
        raise APIError(400, f"stop strings must be non-empty, got {stop!r}", param="stop")

    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    if top_p == 0:
        temperature, top_p = 0.0, 1.0  # only the most likely token is left
    # The engine ends a row at block_size anyway, so larger budgets all decode alike.
    budget = min(max_tokens if max_tokens is not None else block_size, block_size)
    params = SamplingParams(max_new_tokens=budget, temperature=temperature, top_k=request.top_k or 0, top_p=top_p,
                            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
                            stop=stop, stop_token_ids=list(stop_ids), seed=request.seed)
    if params.temperature == 0:
        # Greedy decoding reads neither the filters nor the random generator.
        params.top_k, params.top_p, params.seed = 0, 1.0, None
    problems = params.problems()
    if problems:
        raise APIError(400, "; ".join(problems))
    return params


# ---------------------------------------------------------------------------
# The worker: one thread that owns the model and runs batches through the engine


@dataclass(eq=False)
class Job:
    """One request: its prompts (one row each, n rows per prompt), how to sample them,
    and where the worker sends each StepOutput (row = index into `prompts`) or an error."""

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    deliver: Callable[[StepOutput | APIError], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a batch: the engine gives all rows one SamplingParams."""
        p = self.params
        key = (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty, tuple(p.stop),
               tuple(p.stop_token_ids or ()), p.seed)
        # A seeded row's text depends on its index and the batch size, so a seeded job runs alone.
        return key + (id(self),) if p.seed is not None else key


class _Batch:
    """One running `generate_steps` iterator and the jobs whose rows it decodes."""

    def __init__(self, jobs: list[Job], steps) -> None:
        self.steps = steps
        self.owners = [(job, index) for job in jobs for index in range(len(job.prompts))]
        self.open_rows = {job: len(job.prompts) for job in jobs}  # unfinished rows of unfinished jobs

    def abandoned(self) -> bool:
        return all(job.cancelled.is_set() for job in self.open_rows)

    def advance(self) -> bool:
        """Decode one token per active row and deliver it; return whether rows remain."""
        outputs = next(self.steps, None)
        if outputs is None:
            return False
        for out in outputs:
            job, index = self.owners[out.row]
            if not job.cancelled.is_set():
                job.deliver(out._replace(row=index))
            if out.finish_reason is not None:
                self.open_rows[job] -= 1
                if self.open_rows[job] == 0:
                    del self.open_rows[job]
        return bool(self.open_rows)

    def fail(self, error: APIError) -> None:
        for job in self.open_rows:
            job.deliver(error)
        self.open_rows.clear()


class BatchWorker:
    """Run jobs through the engine on one thread; see the module docstring for the policy."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, dtype: torch.dtype | None = None,
                 max_batch_size: int = 16, batch_wait_s: float = 0.005) -> None:
        self.model, self.tokenizer, self.dtype = model, tokenizer, dtype
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._pending: deque[Job] = deque()  # shared with the request handlers, under _condition
        self._batches: list[_Batch] = []  # touched by the worker thread only
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Written by the worker thread after every round, read by anyone.
        self.active_rows = 0  # rows still decoding, including those of cancelled jobs that share a batch
        self.peak_rows = 0  # maximum number of rows decoded at once so far

    @property
    def queued_jobs(self) -> int:
        with self._condition:
            return len(self._pending)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gptlab-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; every unfinished job gets a 503 error."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: Job) -> None:
        with self._condition:
            if self._stopping:
                raise APIError(503, "the server is shutting down", kind="server_error")
            self._pending.append(job)
            self._condition.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._condition:
            self._condition.notify()

    def _run(self) -> None:
        # Eval mode once here, so that the engine's restoring of the mode never switches
        # dropout on under a generation of the chat page running beside this thread.
        self.model.eval()
        while True:
            with self._condition:
                while not (self._stopping or self._pending or self._batches):
                    self._condition.wait()
                if self._stopping:
                    break
                idle = not self._batches
            if idle and self.batch_wait_s > 0:
                time.sleep(self.batch_wait_s)
            self._admit()
            for batch in list(self._batches):
                self._advance(batch)
            self.active_rows = self._count_rows()
        self._shut_down()

    def _count_rows(self) -> int:
        return sum(sum(batch.open_rows.values()) for batch in self._batches)

    def _admit(self) -> None:
        """Start batches for the waiting jobs that fit, oldest first."""
        with self._condition:
            waiting = [job for job in self._pending if not job.cancelled.is_set()]
            room = self.max_batch_size - self._count_rows()
            admitted = []
            while waiting and len(waiting[0].prompts) <= room:
                room -= len(waiting[0].prompts)
                admitted.append(waiting.pop(0))
            self._pending = deque(waiting)
        groups: dict[tuple, list[Job]] = {}
        for job in admitted:
            groups.setdefault(job.batch_key(), []).append(job)
        for jobs in groups.values():
            self._start_batch(jobs)

    def _start_batch(self, jobs: list[Job]) -> None:
        prompts = [prompt for job in jobs for prompt in job.prompts]
        try:
            steps = generate_steps(self.model, prompts, jobs[0].params, tokenizer=self.tokenizer, dtype=self.dtype)
        except ValueError as error:
            # The handlers check requests first, so this is a check they miss.
            logger.warning("requests %s rejected by the engine: %s", [job.request_id for job in jobs], error)
            for job in jobs:
                job.deliver(APIError(400, str(error)))
            return
        self._batches.append(_Batch(jobs, steps))
        self.peak_rows = max(self.peak_rows, self._count_rows())
        logger.debug("started a batch of %d rows for %s", len(prompts), [job.request_id for job in jobs])

    def _advance(self, batch: _Batch) -> None:
        if batch.abandoned():
            self._finish(batch)
            return
        try:
            more = batch.advance()
        except Exception as error:  # a failure of one batch, even a bug, must not stop the worker
            ids = [job.request_id for job in batch.open_rows]
            logger.exception("generation failed for requests %s", ids)
            batch.fail(APIError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error"))
            more = False
        if not more:
            self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        batch.steps.close()  # frees the batch's KV cache
        self._batches.remove(batch)

    def _shut_down(self) -> None:
        error = APIError(503, "the server is shutting down", kind="server_error")
        for batch in list(self._batches):
            batch.fail(error)
            self._finish(batch)
        self.active_rows = 0
        with self._condition:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            job.deliver(error)


# ---------------------------------------------------------------------------
# Responses


@dataclass
class _Choice:
    text: str = ""
    n_tokens: int = 0
    finish_reason: str | None = None


def _event_source(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[Any], None]:
    """Return a function the worker thread calls to put an event into `queue` on `loop`."""
    def deliver(event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
            loop.call_soon_threadsafe(queue.put_nowait, event)
    return deliver


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion_tokens = sum(choice.n_tokens for choice in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Generation:
    """One request in flight: its job on the worker and the events coming back."""

    def __init__(self, worker: BatchWorker, request: Request, prompts: list[list[int]], params: SamplingParams,
                 *, chat: bool, model_name: str, prompt_tokens: int) -> None:
        self.worker, self.request, self.chat = worker, request, chat
        self.request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.model_name = model_name
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens  # counted once per prompt, not once per choice, as OpenAI does
        self.choices = [_Choice() for _ in prompts]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job = Job(self.request_id, prompts, params, _event_source(asyncio.get_running_loop(), self.queue))
        self.start = time.perf_counter()

    def _record(self, out: StepOutput) -> None:
        choice = self.choices[out.row]
        choice.n_tokens += 1
        choice.text += out.text
        choice.finish_reason = out.finish_reason

    def _open(self) -> int:
        return sum(choice.finish_reason is None for choice in self.choices)

    def _log(self, outcome: str) -> None:
        logger.info("%s: %d prompt tokens, %d completion tokens in %.2f s, %s", self.request_id, self.prompt_tokens,
                    sum(c.n_tokens for c in self.choices), time.perf_counter() - self.start, outcome)

    async def complete(self) -> Response:
        """Run the job and return the whole response; cancel the job if the client disconnects."""
        self.worker.submit(self.job)
        try:
            while self._open():
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
                except TimeoutError:
                    if await self.request.is_disconnected():
                        self._log("client disconnected")
                        return Response(status_code=499)
                    continue
                if isinstance(event, APIError):
                    raise event
                self._record(event)
        finally:
            self.worker.cancel(self.job)
        self._log("finish " + ",".join(c.finish_reason for c in self.choices))
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                        "finish_reason": c.finish_reason} for i, c in enumerate(self.choices)]
        else:
            choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                       for i, c in enumerate(self.choices)]
        return JSONResponse({"id": self.request_id, "object": self.object, "created": self.created,
                             "model": self.model_name, "choices": choices,
                             "usage": _usage(self.prompt_tokens, self.choices)})

    def _chunk(self, index: int, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.chat:
            delta = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text:
                delta = {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.request_id, "object": self.chunk_object, "created": self.created,
                "model": self.model_name, "choices": [choice]}

    async def stream(self, include_usage: bool) -> AsyncIterator[str]:
        """Yield server-sent events; closing the iterator (a disconnect) cancels the job."""
        def event(chunk: dict) -> str:
            if include_usage:
                chunk["usage"] = None
            return _sse(chunk)

        self.worker.submit(self.job)
        failed = False
        try:
            if self.chat:
                for index in range(len(self.choices)):
                    yield event(self._chunk(index, None, None, role=True))
            while self._open():
                out = await self.queue.get()
                if isinstance(out, APIError):
                    self._log(f"failed: {out.message}")
                    failed = True
                    yield _sse(out.body())
                    return
                self._record(out)
                if out.text:
                    yield event(self._chunk(out.row, out.text, None))
                if out.finish_reason is not None:
                    yield event(self._chunk(out.row, None, out.finish_reason))
            if include_usage:
                yield _sse({"id": self.request_id, "object": self.chunk_object,
                            "created": self.created, "model": self.model_name, "choices": [],
                            "usage": _usage(self.prompt_tokens, self.choices)})
            yield _sse("[DONE]")
            self._log("finish " + ",".join(c.finish_reason for c in self.choices))
        finally:
            if self._open() and not failed:
                self._log("client disconnected")
            self.worker.cancel(self.job)


# ---------------------------------------------------------------------------
# The application


def create_app(model: GPT, tokenizer: Tokenizer, cfg: ServeConfig) -> FastAPI:
    """Build the API for a loaded model. The worker thread starts and stops with the app's lifespan.

    `cfg` gives model_name (else the checkpoint path), api_key (the environment is not read
    here), max_batch_size and batch_wait_ms. The model computes in its own dtype.
    """
    model_name = cfg.model_name or str(cfg.checkpoint)
    block_size = model.config.block_size
    worker = BatchWorker(model, tokenizer, max_batch_size=cfg.max_batch_size, batch_wait_s=cfg.batch_wait_ms / 1000)
    chat_stop_ids = stop_token_ids(tokenizer)
    created = int(time.time())
    expected_auth = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="gptlab API", lifespan=lifespan)
    app.state.worker = worker

    def reject(request: Request, error: APIError) -> JSONResponse:
        logger.info("%s %s: %d %s", request.method, request.url.path, error.status, error.message)
        return error.response()

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return reject(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reject(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return reject(request, APIError(exc.status_code, str(exc.detail), code=code))

    app.add_middleware(_UnexpectedErrors)

    def check_api_key(request: Request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected_auth):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY' with the "
                                "key the server was started with", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gptlab"}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}' "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    def check_prompt(prompt: list[int], param: str) -> None:
        if len(prompt) >= block_size:
            raise APIError(400, f"this model's maximum context length is {block_size} tokens, and the prompt has "
                                f"{len(prompt)} tokens, which leaves no room for a reply; shorten it to at most "
                                f"{block_size - 1} tokens", param=param, code="context_length_exceeded")

    def check_rows(n_rows: int) -> None:
        if n_rows > cfg.max_batch_size:
            raise APIError(400, f"the request asks for {n_rows} sequences (prompts times n) but this server decodes "
                                f"at most {cfg.max_batch_size} at once (its max_batch_size); lower n or send fewer "
                                f"prompts per request", param="n")

    authorized = [Depends(check_api_key)]

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def retrieve_model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        try:
            prompt = render_prompt(tokenizer, [message.as_dict() for message in body.messages], source="messages")
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        check_prompt(prompt, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, max_tokens, chat_stop_ids, block_size)
        check_rows(body.n or 1)
        generation = _Generation(worker, request, [prompt] * (body.n or 1), params, chat=True, model_name=model_name,
                                 prompt_tokens=len(prompt))
        return await _respond(generation, body)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        prompts = completion_prompts(body.prompt, tokenizer, model.config.vocab_size)
        for prompt in prompts:
            check_prompt(prompt, "prompt")
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        params = sampling_params(body, max_tokens, [tokenizer.eot_id], block_size)
        n = body.n or 1
        check_rows(len(prompts) * n)
        rows = [prompt for prompt in prompts for _ in range(n)]  # choice index = prompt index * n + j, as OpenAI
        generation = _Generation(worker, request, rows, params, chat=False, model_name=model_name,
                                 prompt_tokens=sum(len(prompt) for prompt in prompts))
        return await _respond(generation, body)

    return app


async def _respond(generation: _Generation, body: SamplingRequest) -> Response:
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(generation.stream(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await generation.complete()


def completion_prompts(prompt: str | list, tokenizer: Tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt of a /v1/completions request.

    Text starts a new document, after `<|endoftext|>`; token ids are used as given.

    Raises:
        APIError: 400 for an empty list or a token id outside the vocabulary.
    """
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list; give a string, a list of strings or a list of token ids",
                       param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    prompts = []
    for index, item in enumerate(prompt):
        if isinstance(item, str):
            prompts.append([tokenizer.eot_id] + tokenizer.encode(item))
            continue
        if not item:
            raise APIError(400, f"prompt {index} is an empty list of token ids", param="prompt")
        bad = [t for t in item if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"prompt {index} has token ids {bad[:5]} outside the vocabulary 0..{vocab_size - 1}",
                           param="prompt")
        prompts.append(list(item))
    return prompts


# ---------------------------------------------------------------------------
# The stage


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """Resolve the dtype setting: "auto" is float32 on a CPU and bfloat16 where a GPU supports it."""
    if name == "auto" and device.type == "cpu":
        # bfloat16 weights decoded at most 8% faster than float32 in benchmarks/bench_generate.py on a
        # 2-core EPYC, and they change greedy outputs; docs/serving.md has the table.
        return torch.float32
    return resolve_dtype(name, device)


def run(cfg: ServeConfig) -> None:
    """Load the checkpoint and serve the API (and the chat page with --ui) until Ctrl+C.

    Raises:
        FileNotFoundError: the checkpoint folder or one of its files is missing.
        ValueError: the tokenizer or the adapter does not fit the model.
        NotImplementedError: the adapter uses a PEFT feature other than plain LoRA.
    """
    # serve.chat_app imports Gradio, which takes seconds; it also has the loader the chat page uses.
    from serve.chat_app import ChatConfig, build_app, load_chat_model

    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    cfg = dataclasses.replace(cfg, api_key=api_key)
    chat_cfg = ChatConfig(checkpoint=cfg.checkpoint, adapter=cfg.adapter, device=cfg.device)
    model, tokenizer = load_chat_model(chat_cfg)
    device = next(model.parameters()).device
    dtype = serving_dtype(cfg.dtype, device)
    # Weights in the compute dtype: no per-step casts, half the memory in bfloat16.
    model = model.to(dtype).eval()
    app = create_app(model, tokenizer, cfg)
    if cfg.ui:
        import gradio as gr

        gr.mount_gradio_app(app, build_app(model, tokenizer, chat_cfg), path="/ui")

    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info"))
    sock = server.config.bind_socket()
    host, port = sock.getsockname()[:2]
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    logger.info("serving %s in %s at %s/v1%s%s", cfg.model_name or cfg.checkpoint, str(dtype).removeprefix("torch."),
                base, f", chat page at {base}/ui" if cfg.ui else "", ", requests need the API key" if api_key else "")
    if cfg.host not in LOCAL_HOSTS:
        logger.warning("listening on %s: anyone who can reach this address can use the model%s", cfg.host,
                       "" if api_key else ", and no API key is set")
    if cfg.ui and api_key:
        logger.warning("the chat page at /ui has no login; the API key protects /v1 only")
    server.run(sockets=[sock])
