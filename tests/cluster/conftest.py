"""Cluster tests use the end-to-end fixtures (a small model repository, real servers)."""

from tests.e2e.conftest import model_repo

__all__ = ["model_repo"]
