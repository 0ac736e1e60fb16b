"""Serving: config.py (the handler: section of model_config.yaml, and the engine it builds), loop.py (the per-step
serving loop), protocol.py (the native /predictions protocol), fields.py (JSON field checks shared by config and
protocols), metrics.py (metric names).

Imports engine, checkpoints, model and text; nothing imports it but handler.py and the scripts. Never TorchServe:
handler.py adapts TorchServe to it.
"""
