"""`python -m gpt_fast.tiny OUT_DIR`: the command line of gpt_fast/checkpoints/tiny.py."""
from .checkpoints.tiny import main

if __name__ == "__main__":
    main()
