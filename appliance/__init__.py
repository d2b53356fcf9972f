"""bankllm: an LLM appliance for air-gapped banks."""

__version__ = "0.1.0"
