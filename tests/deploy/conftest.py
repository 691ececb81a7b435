"""Deploy tests start slimserve on the end-to-end model repository."""

from tests.e2e.conftest import model_repo

__all__ = ["model_repo"]
