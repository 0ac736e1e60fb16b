from pathlib import Path

import pytest
import torch
import yaml
from hf_tokenizers import byte_level
from test_serve import ROOT, served

from gpt_fast.checkpoints import default_model
from gpt_fast.checkpoints.gguf import convert_gguf
from gpt_fast.checkpoints.load import load_model
from gpt_fast.checkpoints.tiny import build_tiny
from gpt_fast.model.args import ModelArgs
from gpt_fast.text.tokenizer import load_tokenizer

# The demo's model config with a shorter context: a smaller KV cache to allocate, the same engine otherwise.
SMOLLM2_MAX_SEQ_LEN = 512


def smollm2_config() -> str:
    config = yaml.safe_load((ROOT / "model_config_cpu.yaml").read_text())
    config["handler"]["max_seq_len"] = SMOLLM2_MAX_SEQ_LEN
    return yaml.safe_dump(config)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The embedded tiny model (tokenizer.model, model.pth, config.json), built once per test session."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real model of the tests: SmolLM2-135M-Instruct (Q4_1 GGUF), the embedded default model."""
    try:
        return default_model.gguf_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf: Path, tmp_path_factory) -> Path:
    """SmolLM2 converted once per session with fp32 weights: its Q4_1 weights exactly, so a model loaded in fp32
    compares with transformers' fp32 model of the same GGUF (loaded in bf16 it is the usual bf16 model)."""
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf(smollm2_gguf, out, dtype=torch.float32)
    return out


@pytest.fixture(scope="session")
def smollm2_server(smollm2_checkpoint, tmp_path_factory, request):
    """SmolLM2 served as scripts/demo.sh serves it (model_config_cpu.yaml: bf16, eager, batch 8, prefix cache;
    context SMOLLM2_MAX_SEQ_LEN) by a real TorchServe on free ports, named gpt-fast, archived in place as the demo
    does (a tarball of the fp32 checkpoint costs a minute of gzip); stopped at the session's end."""
    yield from served(smollm2_checkpoint, tmp_path_factory.mktemp("serve_smollm2"), request,
                      {"gpt-fast": smollm2_config()}, in_place=True)


@pytest.fixture(scope="session")
def parts(tiny_checkpoint):
    """The tiny model in fp32 and its tokenizer, for in-process serving tests (tests/test_serving.py's make_loop)."""
    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32)
    return model, load_tokenizer(tiny_checkpoint, model.args.tokenizer)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skips without one); `pytest -m cuda` runs them "
                                       "(scripts/gpu_check.sh)")


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
