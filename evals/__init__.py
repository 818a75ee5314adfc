"""The evaluation harness: language modelling, multiple choice, generation and chat tasks
(`gptlab eval`, see evals/harness.py)."""
