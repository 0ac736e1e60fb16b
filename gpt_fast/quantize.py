"""`python -m gpt_fast.quantize CHECKPOINT --mode int8|int4 [--groupsize N]`: see gpt_fast/checkpoints/quantize.py."""
from .checkpoints.quantize import main

if __name__ == "__main__":
    main()
