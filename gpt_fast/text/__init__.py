"""Text <-> token ids: base.py (the Tokenizer interface), tokenizer.py (sentencepiece, tiktoken; which one a
checkpoint has), hf_tokenizer.py (tokenizer.json), chat.py (chat templates), detokenizer.py (streamed text deltas).

Imports nothing else of gpt_fast.
"""
