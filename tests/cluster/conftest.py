"""Cluster tests use the end-to-end fixtures (a small model repository, real servers) and the
tiny Llama for the OpenAI API."""

from tests.e2e.conftest import model_repo
from tests.runtimes.llm.conftest import tiny_llama_dir

__all__ = ["model_repo", "tiny_llama_dir"]
