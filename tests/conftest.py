import pytest
from hf_tokenizers import byte_level

from gpt_fast.checkpoints.tiny import build_tiny
from gpt_fast.model.args import ModelArgs


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The embedded tiny model (tokenizer.model, model.pth, config.json), built once per test session."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny model's weights with a tokenizer.json tokenizer (byte-level BPE, ChatML template): a "huggingface"
    checkpoint whose 401 tokens are fewer than the model's 515 embedding rows, like a padded vocabulary."""
    directory = byte_level(tmp_path_factory.mktemp("chat"))
    (directory / "model.pth").symlink_to(tiny_checkpoint / "model.pth")
    args = ModelArgs.load(tiny_checkpoint / "config.json")
    args.tokenizer = "huggingface"
    args.save(directory / "config.json")
    return directory
