"""Text <-> token ids: tokenizer.py (the tokenizer families), detokenizer.py (streamed text deltas).

Imports nothing else of gpt_fast.
"""
