"""Supervised fine-tuning stage: chat data inspection and instruction tuning (full or LoRA)."""
