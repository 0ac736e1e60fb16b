"""TorchServe handler: a thin adapter from TorchServe's continuous batching to gpt_fast.serving's ServingLoop.

model_config.yaml sets `continuousBatching: true`, so every handle() call is one engine step for all
in-flight requests: new ones carry their body, ones already seen arrive as {}, and a client that went away
simply stops appearing. Each call returns one item per request; TorchServe sends it as the next HTTP chunk
of that request's response, and `ctx.stopping_criteria` tells it which responses are complete. The URL's rest
after /predictions/<model>/<version>/ (TorchServe's `url_path` header, e.g. v1/chat/completions) picks the API.
"""
import logging
import os
import time
from http import HTTPStatus
from typing import Any, Callable, Optional

import torch
from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes

from gpt_fast.serving import metrics
from gpt_fast.serving.config import HandlerConfig, build_engine
from gpt_fast.serving.loop import Reply, ServingLoop

logger = logging.getLogger(__name__)

# name -> (type, unit, labels after ModelName); scripts/metrics.yaml lists the same for the frontend.
METRICS = {
    metrics.TIME_TO_FIRST_TOKEN: (MetricTypes.HISTOGRAM, "s", []),
    metrics.INTER_TOKEN_LATENCY: (MetricTypes.HISTOGRAM, "s", []),
    metrics.ACCEPTANCE_RATE: (MetricTypes.HISTOGRAM, "ratio", []),
    metrics.GENERATED_TOKENS: (MetricTypes.COUNTER, "count", []),
    metrics.REQUESTS_FINISHED: (MetricTypes.COUNTER, "count", ["Reason"]),
    metrics.ACTIVE_SLOTS: (MetricTypes.GAUGE, "count", []),
    metrics.PREFIX_CACHE_BLOCKS: (MetricTypes.COUNTER, "count", ["Event"]),
    metrics.PREFIX_CACHE_SAVED_TOKENS: (MetricTypes.COUNTER, "count", []),
}


class GptFastHandler:
    def initialize(self, ctx) -> None:
        props = ctx.system_properties
        config = HandlerConfig.from_dict(ctx.model_yaml_config.get("handler"), props["batch_size"])
        self.loop = ServingLoop(lambda: build_engine(config, props["model_dir"], props.get("gpu_id")),
                                config.default_params(), _emitter(ctx), model_name=ctx.model_name)
        start = time.perf_counter()
        self.loop.warmup()  # compiles every shape now, so the first request is as fast as the tenth
        engine, cache_hits = self.loop.engine, torch._dynamo.utils.counters["inductor"]
        logger.info("warm-up (compile=%s, max_batch_size=%d, max_seq_len=%d) took %.1f s; compile cache %s: "
                    "%d graphs reused, %d compiled; prefix cache %d blocks", config.compile, config.max_batch_size,
                    engine.max_seq_len, time.perf_counter() - start,
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"), cache_hits["fxgraph_cache_hit"],
                    cache_hits["fxgraph_cache_miss"], engine.prefix_cache.num_blocks if engine.prefix_cache else 0)

    def handle(self, data: list[dict], ctx) -> list[bytes]:
        batch = [(ctx.request_ids[i], _body(item), ctx.get_request_header(i, "url_path") or "")
                 for i, item in enumerate(data)]
        replies = self.loop.step(batch)
        for i, reply in enumerate(replies):
            if reply.first:  # only the first reply's status and headers reach the client
                ctx.set_response_status(reply.status, HTTPStatus(reply.status).phrase, idx=i)
                ctx.set_response_content_type(i, reply.content_type)
        ctx.stopping_criteria = [_criterion(reply) for reply in replies]
        return [reply.body for reply in replies]


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
