"""gptlab, the command-line tool: runs each pipeline stage from a config, with presets."""
