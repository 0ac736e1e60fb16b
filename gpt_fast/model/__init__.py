"""The model: a Llama-family Transformer over a slot KV cache, its layers, quantized forms and tensor-parallel split.

args.py (ModelArgs, quantization schemes, named shapes), layers.py (norm, RoPE, KV cache, shardable Linear),
transformer.py (attention, feed-forward, mixture of experts, the Transformer), quantized.py (int8/int4 layers),
cpu_kernels.py + int8_matmul.cpp, int4_matmul.cpp, bf16_matvec.cpp (the CPU matmul kernels) and decode_attention.cpp
(the CPU attention of few-row steps), matvec.py (the CPU compile pass for few-row matmuls), tp.py (tensor
parallelism over torchrun's ranks).

Imports nothing else of gpt_fast: everything above builds on it.
"""
