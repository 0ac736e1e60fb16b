"""The serving loop over a step-driven frontend: one call per step, every in-flight request in it.

TorchServe's continuous batching calls the handler once per step with every in-flight request and expects
one reply per request. `ServingLoop.step` is that call without TorchServe: (request id, body or None, URL path) in,
`Reply` out, so handler.py stays a thin adapter and all of this is testable in-process. What a request says and
how its answer is written is the protocol's, chosen by the path's first segment: "" the native one (protocol.py),
"v1" OpenAI's (openai.py); the loop admits, steps, cancels and counts.
"""
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from ..engine.engine import Engine, InvalidPromptError, PromptTooLongError
from ..engine.prefix_cache import PrefixCacheStats
from ..engine.request import StepOutput
from ..engine.sampling import SamplingParams
from ..model import tp
from . import metrics
from .fields import RequestError
from .metrics import Emit
from .openai import OpenAIProtocol
from .protocol import TEXT, Answer, NativeProtocol, Response

logger = logging.getLogger(__name__)

# Steps the decode thread runs ahead of a frontend that has not come back for the results.
MAX_STEPS_PER_CALL = 64
# What a request hears when our code, not its input, failed it (the traceback goes to the log).
INTERNAL_ERROR = "internal error while serving this request (the server log has the details)"


@dataclass
class Reply:
    """What to send one request after a step."""
    body: bytes  # b"" sends nothing visible (an empty chunk is dropped by the HTTP encoder)
    finished: bool
    first: bool  # the request's first reply: it carries the HTTP status and headers
    status: int = 200
    content_type: str = TEXT


@dataclass
class _Tracked:
    response: Response
    arrived: float
    first_token_at: Optional[float] = None
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0


class ServingLoop:
    """Maps the frontend's per-step batches onto Engine steps; all state is keyed by request id.

    Decoding runs on a background thread while TorchServe carries the replies to the clients and brings the
    next batch (~1.5 ms through its Java frontend on a 2-core CPU): it keeps stepping until the next call
    collects what it produced, so a small model decodes at engine speed, not at the frontend's round-trip
    rate. A call answers with what was decoded since the previous call; a new request's first reply is
    therefore empty (it carries the HTTP status and headers) unless the request is rejected.
    """

    def __init__(self, build_engine: Callable[[], Engine], defaults: SamplingParams,
                 emit: Emit = lambda name, value, **labels: None, model_name: str = "model"):
        # One thread does all of the engine's torch work: building it (loading weights), warm-up and every step.
        # CUDA graphs are recorded per thread, and so is CUDA's current device (which compiled graphs and NCCL
        # use). On CPU, a second thread that ran OpenMP regions leaves libgomp managing more threads than cores,
        # and it then stops spin-waiting between regions: the decode step ran ~20% slower (BENCHMARKS.md).
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.engine = self._engine_thread.submit(_build_on_device, build_engine).result()
        self.emit, engine = emit, self.engine
        # By the URL path's first segment: /predictions/<model>[/<version>] and .../<version>/v1/...
        self.protocols = {
            "": NativeProtocol(engine.tokenizer, defaults, engine.max_seq_len, engine.speculator is not None),
            "v1": OpenAIProtocol(model_name, engine.tokenizer, defaults, engine.max_seq_len)}
        self.tracked: dict[str, _Tracked] = {}
        self._running: Optional[Future] = None  # the steps started by the previous call
        self._collecting = threading.Event()  # tells the running steps to finish
        self._active_slots = -1
        # Under tensor parallelism each step is a round of collectives: every rank must run the same steps.
        self._tensor_parallel = tp.world_size() > 1
        self._prefix_stats_sent = PrefixCacheStats()

    def warmup(self) -> None:
        self._engine_thread.submit(self.engine.warmup).result()

    def step(self, batch: list[tuple[str, Any, str]]) -> list[Reply]:
        """batch: (request id, body, URL path after /predictions/<model>/<version>/) per in-flight request, body
        None for one already seen. One Reply each."""
        self._collecting.set()  # the steps the previous call started end with the one in flight
        return self._engine_thread.submit(self._advance, batch).result()

    def _advance(self, batch: list[tuple[str, Any, str]]) -> list[Reply]:
        """On the engine thread, after the steps the previous call started.

        What fails one request (its body, its text, a bug it runs into) is caught where that request is handled
        and ends it alone; only what fails the engine step itself ends up here.
        """
        try:
            return self._answer(batch)
        except BaseException:
            # The frontend fails and forgets every request of this call: free them all here too.
            for rid in list(self.tracked):
                self._cancel(rid)
            raise

    def _answer(self, batch: list[tuple[str, Any, str]]) -> list[Reply]:
        outputs, done = self._collect()
        # Under tensor parallelism every rank serves rank 0's batch. TorchServe 0.12 writes a call to the other
        # ranks asynchronously, possibly after rank 0's reply has marked a new request as delivered: they may
        # get it without its body.
        served = tp.rank0_object(batch) if self._tensor_parallel else batch
        present = {rid for rid, _, _ in served}
        for rid in [rid for rid in self.tracked if rid not in present]:
            self._cancel(rid)  # the frontend dropped it: the client went away
        replies = {out.request_id: self._reply(out, done) for out in outputs if out.request_id in self.tracked}
        now = time.perf_counter()
        for rid, body, path in served:
            if rid not in self.tracked and rid not in replies:
                replies[rid] = self._admit(rid, body, path, now)
        if self.engine.num_active != self._active_slots:
            self._active_slots = self.engine.num_active
            self.emit(metrics.ACTIVE_SLOTS, self._active_slots)
        if self.engine.prefix_cache is not None:
            self._emit_prefix_stats(self.engine.prefix_cache.stats)
        if self.engine.num_active:
            self._running = self._engine_thread.submit(self._engine_steps)
        # Requests still waiting for a slot have nothing to say yet. (Only rank 0's replies are sent.)
        return [replies.get(rid) or Reply(b"", finished=False, first=False) for rid, _, _ in batch]

    def _emit_prefix_stats(self, stats: PrefixCacheStats) -> None:
        """What changed since the last call (the engine thread is not running)."""
        sent = self._prefix_stats_sent
        for event, now, before in (("hit", stats.hit_blocks, sent.hit_blocks),
                                   ("miss", stats.miss_blocks, sent.miss_blocks),
                                   ("evicted", stats.evicted_blocks, sent.evicted_blocks)):
            if now > before:
                self.emit(metrics.PREFIX_CACHE_BLOCKS, now - before, event=event)
        if stats.saved_tokens > sent.saved_tokens:
            self.emit(metrics.PREFIX_CACHE_SAVED_TOKENS, stats.saved_tokens - sent.saved_tokens)
        self._prefix_stats_sent = replace(stats)

    def _engine_steps(self) -> tuple[list[StepOutput], float]:
        """Step until the next call collects (at least once); one merged output per request."""
        merged: dict[str, StepOutput] = {}
        for _ in range(MAX_STEPS_PER_CALL):
            for out in self.engine.step():
                earlier = merged.get(out.request_id)
                merged[out.request_id] = earlier.followed_by(out) if earlier else out
            if not self.engine.num_active or self._stop_stepping():
                break
        return list(merged.values()), time.perf_counter()

    def _stop_stepping(self) -> bool:
        """Whether the next call is collecting; under tensor parallelism, whether rank 0's is.

        Every rank gets the same calls, but at its own times, so rank 0 alone decides when the steps stop:
        every rank then answers each call with the same steps' outputs.
        """
        if self._tensor_parallel:
            return tp.rank0_flag(self._collecting.is_set())
        return self._collecting.is_set()

    def _collect(self) -> tuple[list[StepOutput], float]:
        """The outputs of the steps the previous call started (done: they ran on this thread) and when they ended."""
        running, self._running = self._running, None
        self._collecting.clear()
        if running is None:
            return [], time.perf_counter()
        return running.result()

    def _admit(self, rid: str, body: Any, path: str, now: float) -> Reply:
        """Validate and queue a new request, or answer it at once (a bad one, or one that generates nothing)."""
        protocol = self.protocols.get(path.split("/", 1)[0], self.protocols[""])
        try:
            request = protocol.parse(rid, body, path)
            if isinstance(request, Answer):
                return Reply(request.body, finished=True, first=True, status=request.status,
                             content_type=request.content_type)
            try:
                self.engine.add(rid, request.prompt_ids, request.params)
            except InvalidPromptError as e:
                code = "context_length_exceeded" if isinstance(e, PromptTooLongError) else None
                raise RequestError(request.prompt_field, str(e), code=code) from None
            first = request.response.start()
        except RequestError as e:
            error = protocol.error(e)
        except Exception:  # a bug this request ran into: its own 500, not the batch's
            logger.exception("request %s failed on admission", rid)
            self.engine.cancel(rid)
            error = protocol.error(RequestError(None, INTERNAL_ERROR, status=500, code="internal_error"))
        else:
            self.tracked[rid] = _Tracked(request.response, arrived=now)
            return Reply(first, finished=False, first=True, content_type=request.response.content_type)
        self.emit(metrics.REQUESTS_FINISHED, 1, reason="error")
        return Reply(error.body, finished=True, first=True, status=error.status, content_type=error.content_type)

    def _reply(self, out: StepOutput, done: float) -> Reply:
        tracked = self.tracked[out.request_id]
        if out.finish_reason == "error":  # the engine ended it (and logged why)
            return self._fail(out.request_id)
        try:
            body = tracked.response.render(out)
        except Exception:
            logger.exception("request %s failed", out.request_id)
            return self._fail(out.request_id)
        if out.token_ids and tracked.first_token_at is None:
            tracked.first_token_at = done
            self.emit(metrics.TIME_TO_FIRST_TOKEN, done - tracked.arrived)
        tracked.completion_tokens = out.completion_tokens
        tracked.draft_tokens, tracked.accepted_tokens = out.draft_tokens, out.accepted_tokens
        if out.finished:
            self._finish(out.request_id, out.finish_reason)
            if out.completion_tokens > 1:
                self.emit(metrics.INTER_TOKEN_LATENCY, (done - tracked.first_token_at) / (out.completion_tokens - 1))
        return Reply(body, finished=out.finished, first=False)

    def _fail(self, rid: str) -> Reply:
        """End a request whose answer has begun with an error as its last chunk; the others go on."""
        response = self.tracked[rid].response
        self._cancel(rid, "error")
        return Reply(response.fail(INTERNAL_ERROR), finished=True, first=False)

    def _cancel(self, rid: str, reason: str = "cancelled") -> None:
        self.engine.cancel(rid)
        self._finish(rid, reason)

    def _finish(self, rid: str, reason: str) -> None:
        # Counted per request, not per step: TorchServe logs and parses every metric line the worker prints,
        # which costs the frontend CPU time the decode step would otherwise have.
        tracked = self.tracked.pop(rid)
        self.emit(metrics.GENERATED_TOKENS, tracked.completion_tokens)
        self.emit(metrics.REQUESTS_FINISHED, 1, reason=reason)
        if tracked.draft_tokens:
            self.emit(metrics.ACCEPTANCE_RATE, tracked.accepted_tokens / tracked.draft_tokens)


def _build_on_device(build_engine: Callable[[], Engine]) -> Engine:
    engine = build_engine()
    if engine.device.type == "cuda":
        torch.cuda.set_device(engine.device)
    return engine
