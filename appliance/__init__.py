"""bankllm: an LLM appliance for air-gapped banks."""

import os as _os

__version__ = "0.1.0"

# Offline by design: the Hugging Face libraries otherwise ask the Hub about a model whose name is not a local path
# (peft's state dict asks whether the base's config.json exists there, and only warns when that fails). They read
# these at import time, so they are set here, before any of them is imported. A URL the user gives is fetched by
# appliance/download.py, which these do not touch.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    _os.environ[_name] = "1"
