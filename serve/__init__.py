"""Serving: the Gradio chat page (`gptlab chat`) and the HTTP API (`gptlab serve`)."""
