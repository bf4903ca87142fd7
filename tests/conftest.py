"""Shared fixtures and the `slow` marker.

    python3 -m pytest -q                  everything (CI, the README's command)
    python3 -m pytest -q -m "not slow"    the quick check for one's own loop: no multi-process
                                          runs (torchrun, spawned TP/PP groups, the quickstart)
"""
import pytest

from generation_toy import make_tokenizers


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a multi-process or end-to-end run (seconds to "
                                       "minutes each); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def toy_tokenizers(tmp_path_factory):
    """(text.model path, vqvae.pt path, TokenLayout) of the toy tokenizers (generation_toy.py),
    made once per test session; tests that need their own files make them."""
    return make_tokenizers(str(tmp_path_factory.mktemp("toy_tokenizers")))
