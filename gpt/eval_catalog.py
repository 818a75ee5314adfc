"""The evaluation sets of the data catalog, for `gptlab eval`.

evals/tasks.py reads these record by record (ARC questions, MMLU rows, ...), not
through `gpt.data.load_documents`. The eval stage's default language-modelling text,
tinystories-valid, is in gpt/catalog.py beside the corpus it comes from.
"""

from __future__ import annotations

from gpt.catalog_entry import CatalogEntry

EVAL_ENTRIES: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="arc-easy",
        hub_id="allenai/ai2_arc",
        hub_config="ARC-Easy",
        hub_split="test",
        local=("eval/arc/arc_easy.official.test.jsonl.gz",),
        kind="eval",
        license="CC-BY-SA-4.0",
        description="ARC-Easy test split: 2,376 grade-school science questions with 3 to 5 answer choices.",
    ),
    CatalogEntry(
        name="arc-easy-dev",
        hub_id="allenai/ai2_arc",
        hub_config="ARC-Easy",
        hub_split="validation",
        local=("eval/arc/arc_easy.official.dev.jsonl.gz",),
        kind="eval",
        license="CC-BY-SA-4.0",
        description="ARC-Easy development split (570 questions), the source of ARC-Easy few-shot examples.",
    ),
    CatalogEntry(
        name="arc-challenge",
        hub_id="allenai/ai2_arc",
        hub_config="ARC-Challenge",
        hub_split="test",
        local=("eval/arc/arc_challenge.official.test.jsonl.gz",),
        kind="eval",
        license="CC-BY-SA-4.0",
        description=(
            "ARC-Challenge test split: questions that retrieval and co-occurrence baselines answer wrongly. "
            "The local copy has 1,170 of the official 1,172 questions."
        ),
    ),
    CatalogEntry(
        name="arc-challenge-dev",
        hub_id="allenai/ai2_arc",
        hub_config="ARC-Challenge",
        hub_split="validation",
        local=("eval/arc/arc_challenge.official.dev.jsonl.gz",),
        kind="eval",
        license="CC-BY-SA-4.0",
        description="ARC-Challenge development split (299 questions), the source of its few-shot examples.",
    ),
    CatalogEntry(
        name="mmlu",
        hub_id="cais/mmlu",
        hub_config="all",
        hub_split="test",
        local=("eval/mmlu/test/*_test.csv.gz",),
        kind="eval",
        license="MIT",
        description=(
            "MMLU test split: 14,042 four-choice questions in 57 subjects. The local files are one CSV per "
            "subject with the header question,choice0..choice3,answer (an index 0-3); the subject is the "
            "file name. The Hub copy has question, subject, choices and answer fields."
        ),
    ),
    CatalogEntry(
        name="mmlu-dev",
        hub_id="cais/mmlu",
        hub_config="all",
        hub_split="dev",
        local=("eval/mmlu/dev/*_dev.csv.gz",),
        kind="eval",
        license="MIT",
        description="MMLU dev split: 5 questions per subject, the source of the standard 5-shot prompts.",
    ),
    CatalogEntry(
        name="lambada",
        hub_id="EleutherAI/lambada_openai",
        hub_config="default",
        hub_split="test",
        local=("eval/lambada/lambada_test.jsonl.gz",),
        kind="eval",
        license="CC-BY-4.0",
        description=(
            "LAMBADA test split (5,153 passages) in OpenAI's detokenized version, one {\"text\"} record each: "
            "predict the last word of the passage."
        ),
    ),
    CatalogEntry(
        name="blimp",
        hub_id="",
        local=("eval/blimp/*.jsonl.gz",),
        kind="eval",
        license="CC-BY-4.0",
        description=(
            "BLiMP: 67 paradigms of 1,000 minimal pairs (sentence_good, sentence_bad). Local files only: the "
            "Hub copy nyu-mll/blimp has one configuration per paradigm."
        ),
    ),
    CatalogEntry(
        name="gsm8k",
        hub_id="openai/gsm8k",
        hub_config="main",
        hub_split="test",
        local=("eval/gsm8k/test.jsonl.gz",),
        kind="eval",
        license="MIT",
        description="GSM8K test split: 1,319 grade-school math word problems; the answer follows '####'.",
    ),
    CatalogEntry(
        name="hellaswag",
        hub_id="Rowan/hellaswag",
        hub_split="validation",
        kind="eval",
        license="MIT",
        description=(
            "HellaSwag validation split (10,042 contexts with 4 endings each). Hub only: the data kit has no "
            "copy, so offline runs pass a local JSON Lines file with the Hub's fields instead."
        ),
    ),
    CatalogEntry(
        name="hellaswag-train",
        hub_id="Rowan/hellaswag",
        hub_split="train",
        kind="eval",
        license="MIT",
        description="HellaSwag train split, the source of HellaSwag few-shot examples. Hub only.",
    ),
    CatalogEntry(
        name="alpaca-eval",
        hub_id="tatsu-lab/alpaca_eval",
        hub_config="alpaca_eval",
        hub_split="eval",
        local=("eval/alpaca_eval/text_davinci_003.model_outputs.json.gz",),
        kind="eval",
        license="CC-BY-NC-4.0",
        description=(
            "AlpacaEval: 805 instructions, here with text-davinci-003's outputs (the v1 reference). The eval "
            "stage uses the instructions as chat prompts. Non-commercial."
        ),
    ),
    CatalogEntry(
        name="mt-bench",
        hub_id="HuggingFaceH4/mt_bench_prompts",
        hub_split="train",
        local=("eval/mt_bench/question.jsonl",),
        kind="eval",
        license="Apache-2.0",
        description="MT-Bench: 80 two-turn questions in 8 categories (question_id, category, turns).",
    ),
    CatalogEntry(
        name="vicuna-bench",
        hub_id="",
        local=("eval/vicuna_bench/question.jsonl",),
        kind="eval",
        license="Apache-2.0",
        description="The 80 single-turn Vicuna benchmark questions from FastChat. Local files only.",
    ),
)
