"""gptlab core: the model, tokenizer, chat template, data, training loop, checkpoints and generation shared by every stage."""
