"""Everything that depends on llama-cpp-python's private corners, in one place: an upgrade of llama-cpp-python
touches this file only. Each function imports lazily so importing this module loads no libllama."""

from __future__ import annotations

import contextlib


def quiet_logs() -> None:
    """Silence libllama's own log lines (per-load chatter on stderr) for the whole process."""
    from llama_cpp import _logger  # private: llama-cpp-python keeps the log callback's verbosity here

    _logger.set_verbose(False)


@contextlib.contextmanager
def suppressed_output():
    """Redirect the C-level stdout/stderr to /dev/null for the block (libllama prints from C, past sys.stdout)."""
    from llama_cpp._utils import suppress_stdout_stderr  # private helper, but the one that handles C-level fds

    with suppress_stdout_stderr(disable=False):
        yield


def context_pointer(llm):
    """The raw llama_context pointer of a high-level `llama_cpp.Llama`, for the low-level API (batch decode)."""
    return llm._ctx.ctx  # private: Llama wraps the context in an internal _LlamaContext
