"""Exports of a build for other engines (vLLM)."""
