"""Settings shared by every test."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """Keep the matmul peaks that training runs record (gpt.device) out of the user's ~/.cache."""
    os.environ["GPTLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
