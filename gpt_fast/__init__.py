"""gpt-fast-serve engine: a small, PyTorch-native Llama-family transformer and its generation loop."""
