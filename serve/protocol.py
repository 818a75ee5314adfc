"""The OpenAI request and error formats of `gptlab serve`: request schemas, their
validation, and the conversion of a request into the engine's SamplingParams.

Unknown fields are rejected with HTTP 400 `unknown_parameter`, as OpenAI does, and
strings are never read as numbers. Differences from OpenAI: `max_tokens` larger than
the room left in the model's block_size is accepted, and the reply ends there with
finish_reason "length" (OpenAI rejects it). `top_p` 0 means greedy decoding. `top_k`
and `repetition_penalty` are accepted as extra fields. Logprobs, tools, response
formats other than text, and presence or frequency penalties other than 0 are
rejected with HTTP 400.
"""

from __future__ import annotations

from typing import Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from gpt.generate import SamplingParams
from gpt.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # OpenAI's limit


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

