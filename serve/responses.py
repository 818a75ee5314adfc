"""One request of `gptlab serve` in flight: its job on the batching worker, and
OpenAI's response built from the tokens coming back, whole or as server-sent events
(`data: {...}` chunks, then `data: [DONE]`).

`usage.prompt_tokens` counts each prompt once, whatever `n` is, as OpenAI does. A
client that disconnects cancels its job: a stream notices at once, a whole response
within DISCONNECT_POLL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gpt.generate import SamplingParams, StepOutput
from serve.protocol import APIError, SamplingRequest
from serve.worker import BatchWorker, Job

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still connected


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


class Generation:
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



async def respond(generation: Generation, body: SamplingRequest) -> Response:
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(generation.stream(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await generation.complete()

