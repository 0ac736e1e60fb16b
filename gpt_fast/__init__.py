"""gpt-fast-serve: a small, PyTorch-native transformer, its generation engine and its serving loop.

Packages, each importing only those before it: model (the Transformer, its layers, quantized forms and tensor
parallelism), text (tokenizers), arch (model families' checkpoint formats), engine (scheduling and generation),
checkpoints (convert, load, quantize), serving (the handler's config, loop and protocols). The modules here are the
command lines: generate, eval, convert, download, quantize, tiny.
"""
