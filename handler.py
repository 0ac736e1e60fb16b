"""TorchServe handler: a thin adapter from TorchServe's continuous batching to gpt_fast.serving.ServingLoop.

model_config.yaml sets `continuousBatching: true`, so every handle() call is one engine step for all
in-flight requests: new ones carry their body, ones already seen arrive as {}, and a client that went away
simply stops appearing. Each call returns one item per request; TorchServe sends it as the next HTTP chunk
of that request's response, and `ctx.stopping_criteria` tells it which responses are complete.
"""
import logging
import os
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from gpt_fast import tp
from gpt_fast.checkpoint import load_model, resolve_checkpoint
from gpt_fast.config import scheme_name
from gpt_fast.engine import Engine, default_max_seq_len
from gpt_fast.model import Transformer
from gpt_fast.quantized import quantize_model
from gpt_fast.serving import (ACCEPTANCE_RATE, ACTIVE_SLOTS, GENERATED_TOKENS, INTER_TOKEN_LATENCY,
                              PREFIX_CACHE_BLOCKS, PREFIX_CACHE_SAVED_TOKENS, REQUESTS_FINISHED, TIME_TO_FIRST_TOKEN,
                              HandlerConfig, Reply, ServingLoop)
from gpt_fast.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

# name -> (type, unit, labels after ModelName); scripts/metrics.yaml lists the same for the frontend.
METRICS = {
    TIME_TO_FIRST_TOKEN: (MetricTypes.HISTOGRAM, "s", []),
    INTER_TOKEN_LATENCY: (MetricTypes.HISTOGRAM, "s", []),
    ACCEPTANCE_RATE: (MetricTypes.HISTOGRAM, "ratio", []),
    GENERATED_TOKENS: (MetricTypes.COUNTER, "count", []),
    REQUESTS_FINISHED: (MetricTypes.COUNTER, "count", ["Reason"]),
    ACTIVE_SLOTS: (MetricTypes.GAUGE, "count", []),
    PREFIX_CACHE_BLOCKS: (MetricTypes.COUNTER, "count", ["Event"]),
    PREFIX_CACHE_SAVED_TOKENS: (MetricTypes.COUNTER, "count", []),
}


class GptFastHandler:
    def initialize(self, ctx) -> None:
        props = ctx.system_properties
        config = HandlerConfig.from_dict(ctx.model_yaml_config.get("handler"), props["batch_size"])
        self.loop = ServingLoop(lambda: _engine(config, props), config.default_params(), _emitter(ctx))
        start = time.perf_counter()
        self.loop.warmup()  # compiles every shape now, so the first request is as fast as the tenth
        engine, cache_hits = self.loop.engine, torch._dynamo.utils.counters["inductor"]
        logger.info("warm-up (compile=%s, max_batch_size=%d, max_seq_len=%d) took %.1f s; compile cache %s: "
                    "%d graphs reused, %d compiled; prefix cache %d blocks", config.compile, config.max_batch_size,
                    engine.max_seq_len, time.perf_counter() - start,
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"), cache_hits["fxgraph_cache_hit"],
                    cache_hits["fxgraph_cache_miss"], engine.prefix_cache.num_blocks if engine.prefix_cache else 0)

    def handle(self, data: list[dict], ctx) -> list[bytes]:
        batch = [(ctx.request_ids[i], _body(item)) for i, item in enumerate(data)]
        replies = self.loop.step(batch)
        for i, reply in enumerate(replies):
            if reply.first:  # only the first reply's status and headers reach the client
                ctx.set_response_status(reply.status, HTTPStatus(reply.status).phrase, idx=i)
                ctx.set_response_content_type(i, reply.content_type)
        ctx.stopping_criteria = [_criterion(reply) for reply in replies]
        return [reply.body for reply in replies]


def _engine(config: HandlerConfig, props: dict) -> Engine:
    """Load the model (and draft) and build the engine; runs on the serving loop's engine thread."""
    # Under torchrun (parallelType: tp) this joins the ranks' process group; each rank loads its shard.
    device = tp.setup(config.torch_device(props.get("gpu_id")))
    checkpoint = resolve_checkpoint(config.checkpoint_path(props["model_dir"]))
    start = time.perf_counter()
    model = _load(checkpoint, device, config.torch_dtype(), config.quantize, config.groupsize)
    tokenizer = load_tokenizer(checkpoint.parent, model.args.tokenizer, model.args.stop_token_ids)
    draft = None
    if config.speculate == "draft":
        draft = _load(resolve_checkpoint(config.draft_checkpoint_path(props["model_dir"])), device,
                      config.torch_dtype(), config.draft_quantize, None)
    logger.info("loaded in %.1f s on %s (tensor-parallel rank %d of %d), %d CPU threads; speculation: %s",
                time.perf_counter() - start, device, tp.rank(), tp.world_size(), torch.get_num_threads(),
                config.speculate or "off")
    compile_cache = config.compile_cache_path(props["model_dir"])
    if compile_cache:  # read by inductor at each compile: kernels compiled by an earlier start are reused
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
    # Under tensor parallelism every rank must draw the same seeds for requests that bring none.
    return Engine(model, tokenizer, config.max_batch_size, config.max_seq_len or default_max_seq_len(model.args),
                  compile=config.compile, seed=tp.shared_seed(), prefix_cache_bytes=config.prefix_cache_bytes(),
                  speculate=config.speculate, speculate_k=config.speculate_k, draft_model=draft)


def _load(checkpoint: Path, device: torch.device, dtype: Optional[torch.dtype], quantize: Optional[str],
          groupsize: Optional[int]) -> Transformer:
    model = load_model(checkpoint, device, dtype, tp.rank(), tp.world_size())  # under TP: this rank's shard
    if quantize:
        quantize_model(model, quantize, groupsize)
    logger.info("%s: %s, %s", checkpoint, model.tok_embeddings.weight.dtype, scheme_name(model.args.quantization))
    return model


def _body(item: dict) -> Any:
    """A new request's payload: its body (or a form field named data), other form fields, or None if seen."""
    if "body" in item or "data" in item:
        return item.get("body", item.get("data"))
    return item or None


def _criterion(reply: Reply) -> Callable[[Any], Optional[bool]]:
    # False: more chunks follow. True: the last chunk of a stream. But True on a request's FIRST reply makes
    # TorchServe 0.12 send the body without HTTP headers (the client hangs), so a request that is done at
    # once (a rejected one: ServingLoop answers the others' first reply empty) returns None: a plain complete
    # response, after which the frontend drops the job. A 400 must be such a complete response anyway: the
    # frontend closes the connection right after the headers of any status >= 400.
    if reply.finished and reply.first:
        return lambda _: None
    return lambda _: reply.finished


def _emitter(ctx) -> Callable[..., None]:
    """emit(name, value, **labels) into ctx.metrics; a no-op on ranks other than 0 (counts would double)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return lambda name, value, **labels: None
    metrics = {}
    for name, (kind, unit, labels) in METRICS.items():
        try:
            metrics[name] = ctx.metrics.get_metric(name, kind)
        except MetricsCacheKeyError:  # not in the metrics.yaml in use: still logged, not on :8082/metrics
            metrics[name] = ctx.metrics.add_metric_to_cache(name, unit, ["ModelName", *labels], kind)

    def emit(name: str, value: float, **labels: str) -> None:
        metrics[name].add_or_update(value, [ctx.model_name, *labels.values()])  # a fresh list every time

    return emit
