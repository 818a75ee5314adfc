"""Pretraining stage: tokenizer training, corpus tokenization into shards, causal-LM pretraining."""
