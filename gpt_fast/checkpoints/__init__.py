"""Checkpoints: convert.py (Hugging Face -> ours), download.py (from the Hub), load.py (onto a device, with the
tokenizer: the one assembly point), quantize.py (int8/int4 copies), tiny.py (the embedded random model),
default_model.py (where the embedded default model's GGUF file is).

A checkpoint directory holds model.pth, config.json (ModelArgs) and the tokenizer's files. Imports model, arch
and text; never engine or serving.
"""
