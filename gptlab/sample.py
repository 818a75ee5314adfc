"""The `sample` stage: print text a checkpoint generates, streamed as it is produced.

    gptlab sample checkpoint=runs/NAME/pretrain prompt="Once upon a time" num_samples=3

Each sample starts from the end-of-text token (the document boundary), followed by the
prompt when one is given, so the model continues the prompt as the start of a new
document. Sample k (counting from 0) uses the seed `seed + k`, so any one sample can be
reproduced alone. Each sample goes to stdout as the prompt, then the generated text,
then a separator line. Progress messages go to the log.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpt.checkpoint import TOKENIZER_FILE, check_checkpoint_dir, load_model
from gpt.config import option
from gpt.device import resolve_device, resolve_dtype
from gpt.generate import SamplingParams, stream
from gpt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SEPARATOR = "-" * 40

_ESCAPES = {"n": "\n", "t": "\t", ",": ",", "\\": "\\"}


@dataclass
class SampleConfig:
    """Settings of `gptlab sample`."""

    checkpoint: Path = dataclasses.field(metadata={"help": "checkpoint folder to sample from (model.safetensors, model.json, tokenizer.json), for example runs/NAME/pretrain"})
    prompt: str = option("", "text the samples continue; empty starts a new document from the end-of-text token alone")
    num_samples: int = option(3, "number of samples to generate, one after the other")
    max_new_tokens: int = option(200, "maximum number of tokens to generate per sample")
    temperature: float = option(0.8, "softmax temperature; 0 picks the most likely token (greedy)")
    top_k: int = option(50, "sample only among the k most likely tokens; 0 turns the filter off")
    top_p: float = option(0.95, "sample only among the most likely tokens whose probabilities sum to at least top_p; 1.0 turns the filter off")
    repetition_penalty: float = option(1.0, "penalty on tokens already in the prompt or the sample (above 1 discourages repeats); 1.0 turns it off")
    stop: str | list[str] = option("", "strings that end a sample, not printed; on the command line comma-separated, with \\n, \\t, \\, and \\\\ as escapes; in YAML a list")
    seed: int | None = option(1337, "random seed of the first sample; sample k uses seed + k; none for a fresh seed each run")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "device to run on: auto picks cuda when available, else cpu")
    dtype: Literal["float32", "bfloat16"] = option("float32", "compute dtype: float32, or bfloat16 autocast (faster on GPUs and recent CPUs)")

    def stop_strings(self) -> list[str]:
        return parse_stop_strings(self.stop)

    def sampling_params(self, sample_index: int = 0) -> SamplingParams:
        """Build the SamplingParams of sample number `sample_index` (counting from 0)."""
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop_strings(),
            seed=None if self.seed is None else self.seed + sample_index,
        )

    def problems(self) -> list[str]:
        found = []
        if self.num_samples < 1:
            found.append(f"num_samples must be at least 1, got {self.num_samples}")
        found += self.sampling_params().problems()
        return found


def parse_stop_strings(value: str | list[str]) -> list[str]:
    """Split a comma-separated command-line value into stop strings; a list is returned as is.

    In the text form a backslash starts an escape: \\n (newline), \\t (tab), \\, (a
    comma that does not separate) and \\\\ (a backslash). Any other backslash is kept.
    Empty entries are dropped, so "" means no stop strings.
    """
    if isinstance(value, list):
        return list(value)
    items, current = [], []
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value) and value[i + 1] in _ESCAPES:
            current.append(_ESCAPES[value[i + 1]])
            i += 2
            continue
        if char == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    items.append("".join(current))
    return [item for item in items if item]


def run(cfg: SampleConfig) -> list[str]:
    """Load the checkpoint and print `cfg.num_samples` samples to stdout as they are generated.

    Returns:
        The generated text of each sample, without the prompt.

    Raises:
        FileNotFoundError: the checkpoint folder or one of its files is missing.
        ValueError: the tokenizer does not fit the model, or the prompt leaves no room
            to generate within the model's block_size.
    """
    ckpt_dir = check_checkpoint_dir(cfg.checkpoint)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = Tokenizer.from_file(ckpt_dir / TOKENIZER_FILE)
    model = load_model(ckpt_dir, device=device)
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{ckpt_dir / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {config.vocab_size}; the tokenizer does not belong to this checkpoint: copy the "
                         f"tokenizer.json the model was trained with into {ckpt_dir}")
    logger.info("loaded %s: %.2fM parameters, block_size %d, on %s in %s", ckpt_dir,
                model.num_parameters() / 1e6, config.block_size, device, str(dtype).removeprefix("torch."))

    prompt_ids = [tokenizer.eot_id] + tokenizer.encode(cfg.prompt)
    if len(prompt_ids) >= config.block_size:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens long (with the end-of-text token in front) but the "
                         f"model's block_size is {config.block_size}, which leaves no room to generate; shorten the "
                         f"prompt to at most {config.block_size - 2} tokens")

    samples = []
    for index in range(cfg.num_samples):
        samples.append(_print_sample(model, tokenizer, prompt_ids, cfg, index, dtype))
    return samples


def _print_sample(model, tokenizer, prompt_ids, cfg: SampleConfig, index: int, dtype) -> str:
    start = time.perf_counter()
    out = sys.stdout
    out.write(cfg.prompt)
    out.flush()
    pieces = []
    text_stream = stream(model, tokenizer, prompt_ids, cfg.sampling_params(index), dtype=dtype)
    for piece in text_stream:
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write(f"\n{SEPARATOR}\n")
    out.flush()
    seconds = time.perf_counter() - start
    n_tokens = len(text_stream.tokens)
    logger.info("sample %d/%d: %d tokens in %.2f s (%.1f tokens/s), finish reason %s", index + 1, cfg.num_samples,
                n_tokens, seconds, n_tokens / max(seconds, 1e-9), text_stream.finish_reason)
    return "".join(pieces)
