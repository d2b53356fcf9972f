"""HTTP routes: OpenAI-compatible (openai.py), banking (banking.py), operations and admin (ops.py); thin."""


def scoped(scope: str, *handlers) -> list:
    """Declare the key scope these handlers need (auth.py reads it; a handler without one needs admin)."""
    for handler in handlers:
        handler.opt["scope"] = scope
    return list(handlers)
