"""Tests of `gptlab export` and gpt/hf.py's folder: a tiny GPT with random weights and a
trained tokenizer are exported through the command line, loaded back offline with
AutoModelForCausalLM and AutoTokenizer, and compared with ours: token ids, logits and
greedy generation.

The tokenizer trains on the first 20 KB of tiny-shakespeare from GPTLAB_DATA_DIR, or on
this repository's gpt/model.py when the data folder is not set.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM

from gpt.checkpoint import TOKENIZER_FILE, save_model
from gpt.generate import SamplingParams, generate
from gpt.hf import save_hf_folder
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer
from gptlab.cli import main
from gptlab.export import ExportConfig, run

REPO = Path(__file__).resolve().parents[1]
HF_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}
PROMPTS = ["ROMEO:\nWhat", "First Citizen:\nWe are", "Th"]
STRINGS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \U0001f680 emoji",
    "",
]
SPECIAL_TEXT = "<|user|>hi<|end|> and <|endoftext|>"


def training_text() -> str:
    data_dir = os.environ.get("GPTLAB_DATA_DIR")
    path = Path(data_dir) / "pretrain" / "tinyshakespeare" / "input.txt" if data_dir else None
    if path is not None and path.is_file():
        return path.read_text(encoding="utf-8")[:20_000]
    return (REPO / "gpt" / "model.py").read_text(encoding="utf-8")[:20_000]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    text = training_text()
    documents = [text[i:i + 1000] for i in range(0, len(text), 1000)]
    path = tmp_path_factory.mktemp("tokenizer") / TOKENIZER_FILE
    Tokenizer.train(documents, vocab_size=300).save(path)
    return path


def tiny_gpt(layout: str, vocab_size: int) -> GPT:
    """A 2-layer GPT with every parameter drawn from N(0, 0.3^2), norm weights from 1 + N(0, 0.3^2):
    wide logits give greedy decoding clear maxima and varied tokens, which an untrained
    model with the default initialization (near-uniform logits) would not."""
    overrides = dict(n_kv_head=2) if layout == "llama" else {}
    config = ModelConfig.from_layout(layout, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32, block_size=64,
                                     **overrides)
    torch.manual_seed(0)
    model = GPT(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.3 * torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def exported(request, tokenizer_file, tmp_path_factory):
    """(layout, our model, checkpoint folder, export folder, exit status of `gptlab export`)."""
    layout = request.param
    model = tiny_gpt(layout, Tokenizer.from_file(tokenizer_file).vocab_size)
    root = tmp_path_factory.mktemp(layout)
    ckpt_dir, out_dir = root / "ckpt", root / "hf"
    save_model(model, ckpt_dir, tokenizer_file=tokenizer_file)
    status = main(["export", f"checkpoint={ckpt_dir}", f"out_dir={out_dir}"])
    return layout, model, ckpt_dir, out_dir, status


def test_cli_exit_status(exported):
    *_, status = exported
    assert status == 0


def test_folder_files(exported):
    _, _, _, out_dir, _ = exported
    names = {path.name for path in out_dir.iterdir()}

    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert name in names
    assert "pytorch_model.bin" not in names
    assert not [name for name in os.listdir(out_dir.parent) if name.endswith(".tmp")]


def test_generation_config(exported):
    _, _, _, out_dir, _ = exported
    generation = json.loads((out_dir / "generation_config.json").read_text())

    assert generation["eos_token_id"] == 0
    assert generation["pad_token_id"] == 1


@torch.no_grad()
def test_model_loads_with_same_logits(exported):
    layout, model, _, out_dir, _ = exported
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    idx = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))

    assert type(hf_model) is HF_CLASSES[layout]
    assert hf_model.dtype == torch.float32
    assert (hf_model(idx).logits - model(idx).logits).abs().max().item() < 1e-4


def test_tokenizer_ids_match(exported, tokenizer_file):
    _, _, _, out_dir, _ = exported
    ours = Tokenizer.from_file(tokenizer_file)
    theirs = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)

    for text in STRINGS:
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text, text


def test_tokenizer_special_tokens(exported):
    _, model, _, out_dir, _ = exported
    theirs = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)

    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (0, 0, 1, 0)
    assert theirs.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]) == [2, 3, 4, 5]
    assert sorted(theirs.all_special_ids) == [0, 1, 2, 3, 4, 5]
    assert theirs.model_max_length == model.config.block_size
    assert theirs.decode([3, 70, 5], skip_special_tokens=True) == theirs.decode([70])


def test_special_text_parsed_by_transformers(exported, tokenizer_file):
    """Ours encodes "<|user|>" in text as ordinary text. A transformers tokenizer turns it
    into the special id unless called with split_special_tokens=True."""
    _, _, _, out_dir, _ = exported
    ours = Tokenizer.from_file(tokenizer_file)
    theirs = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)

    parsed = theirs(SPECIAL_TEXT)["input_ids"]
    split = theirs(SPECIAL_TEXT, split_special_tokens=True)["input_ids"]

    assert parsed[0] == 3
    assert 3 not in ours.encode(SPECIAL_TEXT)
    assert split == ours.encode(SPECIAL_TEXT)


def test_greedy_generation_matches(exported, tokenizer_file):
    _, model, _, out_dir, _ = exported
    ours = Tokenizer.from_file(tokenizer_file)
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True)
    theirs = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    theirs.padding_side = "left"
    max_new_tokens = 16

    completions = generate(model, [ours.encode(p) for p in PROMPTS],
                           SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=[0]))
    batch = theirs(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = hf_model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)

    for row, completion in enumerate(completions):
        hf_tokens = output[row, batch["input_ids"].size(1):].tolist()
        if 0 in hf_tokens:
            hf_tokens = hf_tokens[:hf_tokens.index(0) + 1]  # transformers pads rows after their EOS
        assert completion.tokens == hf_tokens, PROMPTS[row]


def test_default_out_dir(exported, tmp_path):
    _, _, ckpt_dir, _, _ = exported
    ckpt_copy = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, ckpt_copy)

    out_dir = run(ExportConfig(checkpoint=str(ckpt_copy)))

    assert out_dir == ckpt_copy / "hf"
    assert (ckpt_copy / "hf" / "model.safetensors").is_file()


def test_missing_checkpoint_file(exported, tmp_path, capsys):
    _, _, ckpt_dir, _, _ = exported
    ckpt_copy = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, ckpt_copy)
    (ckpt_copy / TOKENIZER_FILE).unlink()

    status = main(["export", f"checkpoint={ckpt_copy}", f"out_dir={tmp_path / 'hf'}"])

    assert status == 2
    assert "is missing tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(ExportConfig(checkpoint=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "hf")))


def test_empty_checkpoint_rejected(capsys):
    status = main(["export"])

    assert status == 2
    assert "checkpoint is empty" in capsys.readouterr().err


def test_out_dir_is_checkpoint_rejected(exported):
    _, _, ckpt_dir, _, _ = exported

    with pytest.raises(ValueError, match="is the checkpoint folder"):
        run(ExportConfig(checkpoint=str(ckpt_dir), out_dir=str(ckpt_dir)))


def test_unsupported_layout(tokenizer_file, tmp_path):
    config = ModelConfig.from_layout("llama", pos_encoding="alibi", vocab_size=300, n_layer=2, n_head=4, n_embd=32,
                                     block_size=64)
    save_model(GPT(config), tmp_path / "ckpt", tokenizer_file=tokenizer_file)

    with pytest.raises(NotImplementedError, match=r"model\.json: .*pos_encoding='rope' \(got 'alibi'\)"):
        run(ExportConfig(checkpoint=str(tmp_path / "ckpt"), out_dir=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()


def test_tokenizer_larger_than_vocab(tokenizer_file, tmp_path):
    model = GPT(ModelConfig.from_layout("gpt2", vocab_size=270, n_layer=2, n_head=4, n_embd=32, block_size=64))

    with pytest.raises(ValueError, match="vocab_size is 270"):
        save_hf_folder(model, tokenizer_file, tmp_path / "hf")


def test_chat_template_hook(tokenizer_file, tmp_path):
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    model = GPT(ModelConfig.from_layout("gpt2", vocab_size=300, n_layer=2, n_head=4, n_embd=32, block_size=64))
    save_hf_folder(model, tokenizer_file, tmp_path / "hf", chat_template=template)
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)

    ids = theirs.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)["input_ids"]

    assert theirs.chat_template == template
    assert ids[0] == 3
    assert ids[-1] == 5


def test_reward_model_export_warns(tokenizer_file, tmp_path, caplog):
    ckpt_dir = tmp_path / "reward"
    save_model(tiny_gpt("gpt2", Tokenizer.from_file(tokenizer_file).vocab_size), ckpt_dir,
               tokenizer_file=tokenizer_file, extra={"reward_model": {"head": "reward_head.safetensors"}})
    caplog.set_level("WARNING")
    run(ExportConfig(checkpoint=str(ckpt_dir), out_dir=str(tmp_path / "hf")))
    assert any("without the reward head" in record.getMessage() for record in caplog.records)
