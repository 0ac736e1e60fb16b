"""Generation: engine.py (slot scheduling, chunked prefill, batched decode), runner.py (a model's compiled shape
buckets), request.py (one request's tokens, text and stop conditions), sampling.py, speculative.py (draft model
and prompt lookup), prefix_cache.py.

Imports model and text; never checkpoints or serving.
"""
