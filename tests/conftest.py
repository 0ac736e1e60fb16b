import pytest

from gpt_fast.checkpoints.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The embedded tiny model (tokenizer.model, model.pth, config.json), built once per test session."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skips without one); `pytest -m cuda` runs them "
                                       "(scripts/gpu_check.sh)")
