"""Download from the Hugging Face Hub only the files `gpt_fast.convert` reads.

    python -m gpt_fast.download REPO_ID OUT_DIR

Gated models (Llama) use the token from `hf auth login` / `huggingface-cli login` or HF_TOKEN.
"""
import argparse
import fnmatch
import sys
from pathlib import Path

from huggingface_hub import list_repo_files, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

_ALWAYS = ("config.json", "generation_config.json")
# The tokenizer by gpt_fast.convert's rule: tokenizer.json with its config and chat template, else tokenizer.model.
_HF_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_TOKENIZER_MODEL = ("tokenizer.model", "original/tokenizer.model")
# Only the transformers layout: consolidated*.safetensors and original/*.pth hold the same weights again in
# Mistral's / Meta's own format, and would double the download.
_SAFETENSORS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
_BIN = ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


def select_files(repo_files: list[str]) -> list[str]:
    """Configs, the tokenizer and one weight format (safetensors when the repo has it, else .bin)."""
    def matching(patterns: tuple[str, ...]) -> list[str]:
        return [f for f in repo_files if any(fnmatch.fnmatchcase(f, p) for p in patterns)]

    weights = matching(_SAFETENSORS) or matching(_BIN)
    if not weights:
        raise ValueError("no weights in the transformers layout (model*.safetensors or pytorch_model*.bin)")
    tokenizer = matching(_HF_TOKENIZER) if "tokenizer.json" in repo_files else matching(_TOKENIZER_MODEL)
    return sorted(matching(_ALWAYS) + tokenizer + weights)


def download(repo_id: str, out_dir: Path) -> Path:
    """Fetch repo_id's needed files into out_dir (files already there are not fetched again)."""
    login = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
    try:
        files = select_files(list_repo_files(repo_id))
        snapshot_download(repo_id, local_dir=out_dir, allow_patterns=files)
    except GatedRepoError as e:
        raise PermissionError(f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id}, "
                              f"then {login}") from e
    except RepositoryNotFoundError as e:
        # The Hub answers 401 for private repos without a token, so this may also be a login problem.
        raise FileNotFoundError(f"{repo_id} not found on the Hugging Face Hub (if it is private, {login})") from e
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):
            raise PermissionError(f"not authorized to download {repo_id}: {login}") from e
        raise
    except ValueError as e:
        raise ValueError(f"{repo_id}: {e}") from e
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo_id", help="e.g. meta-llama/Llama-3.1-8B-Instruct")
    parser.add_argument("out_dir", type=Path)
    opts = parser.parse_args()
    try:
        download(opts.repo_id, opts.out_dir)
    except (PermissionError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
