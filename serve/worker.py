"""The batching worker of `gptlab serve`: one thread that owns the model and runs
requests through the generation engine of gpt/generate.py.

Requests wait in a queue. Between two decoding steps the worker starts the waiting
ones, oldest first, as long as the rows in flight stay within max_batch_size.
Requests with the same sampling settings start together as one batch through
`generate_steps`, and the worker advances all running batches in turn, one token
each. A batch cannot take new rows once it has started, because the engine's batch
is fixed at prefill. Rows of one batch share one SamplingParams, so requests with
different settings, and each seeded sampling request, which must get the same text
whatever else is running, start batches of their own. A request is cancelled when its
client disconnects. If no other request shares its batch, the batch closes. Otherwise
its rows keep decoding until the batch ends, and their tokens are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt.generate import SamplingParams, StepOutput, generate_steps
from gpt.model import GPT
from gpt.tokenizer import Tokenizer
from serve.protocol import APIError

logger = logging.getLogger(__name__)


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

