import pytest
import torch

from gpt_fast.checkpoints.load import load_model
from gpt_fast.checkpoints.tiny import build_tiny
from gpt_fast.text.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The embedded tiny model (tokenizer.model, model.pth, config.json), built once per test session."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def parts(tiny_checkpoint):
    """The tiny model in fp32 and its tokenizer, for in-process serving tests (tests/test_serving.py's make_loop)."""
    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    return model, load_tokenizer(tiny_checkpoint, model.args.tokenizer)
