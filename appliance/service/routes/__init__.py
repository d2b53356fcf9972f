"""HTTP routes: OpenAI-compatible (openai.py), banking (banking.py), operations (ops.py)."""
