"""The harness's own metrics, as `evaluate.Metric` subclasses that work offline.

    Accuracy         accuracy of predicted choice indices, with its standard error
    NumberExactMatch exact match of the final number of a reply (GSM8K style)
    BitsPerByte      loss, perplexity and bits per byte from summed negative log-likelihoods
    WinRate          head-to-head win rate of two sets of reward scores, with a bootstrap interval

A local subclass is instantiated directly, `Accuracy().compute(...)`, with no Hub
access: `evaluate.load` is needed only for metrics by Hub name (`load_metric`).
Standard errors are the sample standard deviation over examples divided by sqrt(n),
as lm-evaluation-harness reports them; they are NaN for fewer than two examples.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

import datasets
import evaluate
import numpy as np

NUMBER = re.compile(r"-?[\d,]*\.?\d+")
# The GSM8K answer line: "#### 1,234". The number may carry a $ sign.
FINAL_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


def mean_stderr(values) -> tuple[float, float]:
    """Return the mean of `values` and its standard error (sample std / sqrt(n); NaN when n < 2)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    stderr = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else math.nan
    return float(array.mean()), stderr


def extract_number(text: str, strict: bool = False) -> str | None:
    """Return the final answer written in `text`, normalized, or None.

    The answer is the number after the last "####" when there is one. Otherwise it is
    the last number in the text, or None when `strict`. Commas and a trailing ".0..." are
    dropped, so "1,234.00" and "1234" give the same string.
    """
    marked = FINAL_ANSWER.findall(text)
    if marked:
        found = marked[-1]
    elif strict:
        return None
    else:
        numbers = NUMBER.findall(text)
        if not numbers:
            return None
        found = numbers[-1]
    found = found.replace(",", "")
    try:
        value = Decimal(found)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return str(value.normalize())


class Accuracy(evaluate.Metric):
    """Share of predictions equal to their reference, with its standard error."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Accuracy of integer predictions (choice indices), with the standard error of the mean.",
            citation="",
            inputs_description="predictions: predicted indices; references: gold indices.",
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        correct = np.asarray(predictions) == np.asarray(references)
        value, stderr = mean_stderr(correct)
        return {"accuracy": value, "stderr": stderr}


class NumberExactMatch(evaluate.Metric):
    """Exact match of the final number of each prediction with that of its reference (`extract_number`).

    Pass `strict=True` to `compute` to accept only answers marked with "####".
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Exact match of the final number: after '####' when present, else the last number.",
            citation="",
            inputs_description="predictions: generated texts; references: reference answers or solutions.",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, strict: bool = False) -> dict[str, float]:
        matches = []
        for prediction, reference in zip(predictions, references):
            expected = extract_number(reference)
            matches.append(expected is not None and extract_number(prediction, strict=strict) == expected)
        value, stderr = mean_stderr(matches)
        return {"exact_match": value, "stderr": stderr}


class BitsPerByte(evaluate.Metric):
    """Loss per token, perplexity and bits per byte over documents.

    Each input row is one document (or text span): its summed negative log-likelihood in
    nats, its number of scored tokens and its UTF-8 bytes. Bits per byte is the total
    nll / ln 2 / total bytes, which compares models with different tokenizers.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Loss (nats per token), perplexity and bits per byte from summed negative log-likelihoods.",
            citation="",
            inputs_description="nll: summed nats per document; n_tokens: scored tokens; n_bytes: UTF-8 bytes.",
            features=datasets.Features({"nll": datasets.Value("float64"), "n_tokens": datasets.Value("int64"),
                                        "n_bytes": datasets.Value("int64")}),
        )

    def _compute(self, nll, n_tokens, n_bytes) -> dict[str, float]:
        total_nll, total_tokens, total_bytes = float(np.sum(nll)), int(np.sum(n_tokens)), int(np.sum(n_bytes))
        loss = total_nll / max(total_tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
            "n_tokens": total_tokens,
            "n_bytes": total_bytes,
        }


class WinRate(evaluate.Metric):
    """Share of prompts where the first model's reward beats the second's; a tie counts one half.

    The 95% interval is a percentile bootstrap over prompts: `n_resamples` resamples
    drawn with replacement by a generator seeded with `seed`, and the 2.5th and 97.5th
    percentiles of their win rates.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Head-to-head win rate from paired reward scores, with a percentile-bootstrap 95% interval.",
            citation="",
            inputs_description="predictions: rewards of the model; references: rewards of the opponent, same prompts.",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references, n_resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
        ours, theirs = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
        outcomes = np.where(ours > theirs, 1.0, np.where(ours < theirs, 0.0, 0.5))
        value, stderr = mean_stderr(outcomes)
        rng = np.random.default_rng(seed)
        resampled = outcomes[rng.integers(0, len(outcomes), size=(n_resamples, len(outcomes)))].mean(axis=1)
        low, high = np.percentile(resampled, [2.5, 97.5])
        return {"win_rate": value, "stderr": stderr, "ci_low": float(low), "ci_high": float(high),
                "wins": int((outcomes == 1.0).sum()), "ties": int((outcomes == 0.5).sum()),
                "losses": int((outcomes == 0.0).sum())}


LOCAL_METRICS: dict[str, type[evaluate.Metric]] = {
    "accuracy_stderr": Accuracy,
    "number_exact_match": NumberExactMatch,
    "bits_per_byte": BitsPerByte,
    "win_rate": WinRate,
}


def load_metric(name: str) -> evaluate.EvaluationModule:
    """Return a metric by name: one of `LOCAL_METRICS`, else `evaluate.load(name)` (from the Hub or its cache).

    Raises:
        ValueError: the name is not local and `evaluate.load` failed, for example offline.
    """
    if name in LOCAL_METRICS:
        return LOCAL_METRICS[name](keep_in_memory=True)
    try:
        return evaluate.load(name)
    # evaluate.load raises FileNotFoundError, ConnectionError or a Hub error depending on the failure.
    except Exception as error:
        raise ValueError(f"cannot load the evaluate metric {name!r}: {error}. Metrics by Hub name need the Hugging "
                         f"Face Hub or a cached copy; the local metrics are {', '.join(LOCAL_METRICS)}") from error
