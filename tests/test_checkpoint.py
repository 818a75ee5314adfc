import pytest

from gpt.checkpoint import load_model, load_train_state, save_model
from gpt.model import GPT, ModelConfig


@pytest.fixture
def checkpoint(tmp_path):
    save_model(GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8)), tmp_path)
    return tmp_path


def test_truncated_weights_are_named(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{weights} cannot be read .*damaged or incomplete"):
        load_model(checkpoint)


def test_truncated_resume_state_is_named(tmp_path):
    state = tmp_path / "train_state.pt"
    state.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=rf"{state} cannot be read .*resume state is damaged"):
        load_train_state(tmp_path)
