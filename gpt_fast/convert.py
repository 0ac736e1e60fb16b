"""`python -m gpt_fast.convert HF_DIR OUT_DIR`: the command line of gpt_fast/checkpoints/convert.py."""
from .checkpoints.convert import main

if __name__ == "__main__":
    main()
