"""The `serve` stage: an OpenAI-compatible HTTP API on the generation engine of gpt/generate.py.

    gptlab serve --checkpoint runs/NAME/sft [--adapter DIR] [--port 8000] [--api_key KEY] [--ui]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models and
GET /v1/models/{model}, with OpenAI's request fields and response shapes, streamed as
server-sent events (`data: {...}` chunks, then `data: [DONE]`) when `stream` is true.
Chat prompts are rendered by the chat template of gpt/chat.py and end at `<|end|>`.
Text completions start a new document, so the prompt follows `<|endoftext|>`, as
in `gptlab sample`, and they end at the next `<|endoftext|>`.

The request schemas, their validation and the differences from OpenAI are in
serve/protocol.py. The thread that batches requests through the engine is in
serve/worker.py, and serve/responses.py builds the responses, whole or streamed. This
module builds the app (authentication, model and prompt checks, the handlers) and runs it.
A request naming another model gets 404 `model_not_found`, as OpenAI does.

Security: the server listens on 127.0.0.1 unless `host` says otherwise. `api_key`
protects /v1 only: the chat page mounted at /ui by `--ui` has no login.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.chat import render_prompt, stop_token_ids
from gpt.config import option
from gpt.device import resolve_dtype
from gpt.model import GPT
from gpt.tokenizer import Tokenizer
from serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    completion_prompts,
    sampling_params,
    validation_error,
)
from serve.responses import Generation, respond
from serve.worker import BatchWorker

logger = logging.getLogger(__name__)

API_KEY_ENV = "GPTLAB_API_KEY"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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
# Unexpected errors


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
        generation = Generation(worker, request, [prompt] * (body.n or 1), params, chat=True, model_name=model_name,
                                 prompt_tokens=len(prompt))
        return await respond(generation, body)

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
        generation = Generation(worker, request, rows, params, chat=False, model_name=model_name,
                                 prompt_tokens=sum(len(prompt) for prompt in prompts))
        return await respond(generation, body)

    return app


# ---------------------------------------------------------------------------
# The stage


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """Resolve the dtype setting: "auto" is float32 on a CPU and bfloat16 where a GPU supports it."""
    if name == "auto" and device.type == "cpu":
        # bfloat16 weights change greedy outputs, and in benchmarks/bench_generate.py on a 2-core
        # EPYC they decoded at float32's speed to within about 20%; docs/serving.md has the table.
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
