"""`python -m gpt_fast.download REPO_ID OUT_DIR`: the command line of gpt_fast/checkpoints/download.py."""
from .checkpoints.download import main

if __name__ == "__main__":
    main()
