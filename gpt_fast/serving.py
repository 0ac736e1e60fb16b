"""Serving over a step-driven frontend: handler config, request validation, and one loop step per call.

TorchServe's continuous batching calls the handler once per step with every in-flight request and expects
one reply per request. `ServingLoop.step` is that call without TorchServe: (request id, body or None) in,
`Reply` out, so handler.py stays a thin adapter and all of this is testable in-process.
"""
import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from . import tp
from .checkpoint import DTYPES
from .config import quantization_scheme
from .engine import SPECULATE_MODES, Engine, PromptTooLongError
from .prefix_cache import PrefixCacheStats
from .request import StepOutput
from .sampling import InvalidParam, SamplingParams

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
# Steps the decode thread runs ahead of a frontend that has not come back for the results.
MAX_STEPS_PER_CALL = 64
MAX_STOP_STRINGS = 16  # each is checked against every text delta, so a long list slows the whole batch

# Metric names as they appear on the Prometheus endpoint (listed in scripts/metrics.yaml).
TIME_TO_FIRST_TOKEN = "gpt_fast_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "gpt_fast_inter_token_latency_seconds"
GENERATED_TOKENS = "gpt_fast_generated_tokens_total"
REQUESTS_FINISHED = "gpt_fast_requests_finished_total"
ACTIVE_SLOTS = "gpt_fast_active_slots"
ACCEPTANCE_RATE = "gpt_fast_speculative_acceptance_rate"  # per finished request: accepted / drafted tokens
PREFIX_CACHE_BLOCKS = "gpt_fast_prefix_cache_blocks_total"  # event: hit | miss | evicted
PREFIX_CACHE_SAVED_TOKENS = "gpt_fast_prefix_cache_saved_tokens_total"


@dataclass
class HandlerConfig:
    """The `handler:` section of model_config.yaml."""
    checkpoint: str = "checkpoint"  # checkpoint directory or .pth, relative to the model dir or absolute
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    device: str = "auto"  # auto (the GPU TorchServe assigns, else CPU) | cpu | cuda
    compile: bool = True
    max_batch_size: Optional[int] = None  # None: the frontend's batchSize
    max_seq_len: Optional[int] = None  # None: min(2048, the model's max_position_embeddings)
    # Memory for cached prompt prefixes (keys and values), in MiB; 0 turns prefix caching off.
    prefix_cache_mb: float = 0
    # Where compiled kernels are cached between starts (TORCHINDUCTOR_CACHE_DIR), relative to the model dir or
    # absolute; None: torch's default, $TMPDIR/torchinductor_<user> (scripts/serve.sh's TMPDIR is build/serve/).
    compile_cache_dir: Optional[str] = None
    # Defaults for requests that leave these out.
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # Quantize a bf16/fp32 checkpoint's weights at load time: int8 | int4 (groupsize 32/64/128/256, default 128).
    # A checkpoint quantized ahead with `python -m gpt_fast.quantize` needs neither (its config.json says so).
    quantize: Optional[str] = None
    groupsize: Optional[int] = None
    # Speculative decoding: draft (a draft model proposes speculate_k tokens per step: draft_checkpoint, or this
    # checkpoint quantized with draft_quantize) | lookup (prompt lookup, no draft model). Output is unchanged.
    speculate: Optional[str] = None
    draft_checkpoint: Optional[str] = None  # relative to the model dir or absolute
    draft_quantize: Optional[str] = None  # int8 | int4
    speculate_k: int = 4

    @classmethod
    def from_dict(cls, section: Optional[dict], batch_size: int) -> "HandlerConfig":
        section = dict(section or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"model_config.yaml handler: unknown keys {unknown} (known: {', '.join(known)})")
        if isinstance(section.get("stop"), (str, list)):
            section["stop"] = _stop_strings(section["stop"], "handler.stop")
        config = cls(**section)
        if config.max_batch_size is None:
            config.max_batch_size = batch_size
        config.validate()
        return config

    def validate(self) -> None:
        for f in fields(self):
            kind = _CONFIG_TYPES.get(f.name, str)
            if not _is_type(getattr(self, f.name), kind):
                raise ValueError(f"model_config.yaml handler.{f.name}: expected {_type_name(kind)}, "
                                 f"got {getattr(self, f.name)!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"handler.dtype: {self.dtype!r} is not auto, {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"handler.device: {self.device!r} is not auto, cpu or cuda")
        if self.max_batch_size < 1:
            raise ValueError(f"handler.max_batch_size: {self.max_batch_size} is not >= 1")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"handler.max_seq_len: {self.max_seq_len} is not >= 2")
        if self.prefix_cache_mb < 0:
            raise ValueError(f"handler.prefix_cache_mb: {self.prefix_cache_mb} is not >= 0")
        if self.quantize is not None:
            try:
                quantization_scheme(self.quantize, self.groupsize)
            except ValueError as e:
                raise ValueError(f"handler.quantize: {e}") from None
        elif self.groupsize is not None:
            raise ValueError("handler.groupsize: only used with quantize: int4")
        self._validate_speculation()
        try:
            self.default_params()
        except InvalidParam as e:
            raise ValueError(f"handler.{e}") from None

    def _validate_speculation(self) -> None:
        if self.speculate not in (None, *SPECULATE_MODES):
            raise ValueError(f"handler.speculate: {self.speculate!r} is not {' or '.join(SPECULATE_MODES)}")
        drafts = self.draft_checkpoint is not None or self.draft_quantize is not None
        if drafts and self.speculate != "draft":
            raise ValueError("handler.draft_checkpoint/draft_quantize: only used with speculate: draft")
        if self.speculate == "draft" and not drafts:
            raise ValueError("handler.speculate: draft needs draft_checkpoint or draft_quantize")
        if self.draft_quantize not in (None, "int8", "int4"):
            raise ValueError(f"handler.draft_quantize: {self.draft_quantize!r} is not int8 or int4")
        if not 1 <= self.speculate_k <= 16:
            raise ValueError(f"handler.speculate_k: {self.speculate_k} is not in [1, 16]")

    def default_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, stop=self.stop)

    def checkpoint_path(self, model_dir: Union[str, Path]) -> Path:
        return Path(model_dir) / self.checkpoint  # an absolute checkpoint replaces model_dir

    def draft_checkpoint_path(self, model_dir: Union[str, Path]) -> Path:
        """The draft's weights: draft_checkpoint, or the target's own checkpoint (to be quantized)."""
        return Path(model_dir) / (self.draft_checkpoint or self.checkpoint)

    def compile_cache_path(self, model_dir: Union[str, Path]) -> Optional[Path]:
        return Path(model_dir) / self.compile_cache_dir if self.compile_cache_dir else None

    def prefix_cache_bytes(self) -> int:
        return int(self.prefix_cache_mb * 2**20)

    def torch_device(self, gpu_id: Optional[int]) -> torch.device:
        """The GPU TorchServe assigned when there is one, else the CPU (no CUDA call on the CPU path)."""
        if self.device == "cpu" or (self.device == "auto" and gpu_id is None):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            if self.device == "cuda":
                raise ValueError("handler.device is cuda but CUDA is not available")
            return torch.device("cpu")
        return torch.device("cuda", gpu_id or 0)

    def torch_dtype(self) -> Optional[torch.dtype]:
        return DTYPES.get(self.dtype)  # None: load_model's default for the device


# Types of the HandlerConfig fields that are not strings.
_CONFIG_TYPES = {"compile": bool, "max_batch_size": int, "max_seq_len": (int, type(None)), "max_new_tokens": int,
                 "prefix_cache_mb": float, "compile_cache_dir": (str, type(None)),
                 "top_k": int, "speculate_k": int, "temperature": float, "top_p": float, "stop": tuple,
                 "draft_checkpoint": (str, type(None)), "quantize": (str, type(None)), "speculate": (str, type(None)),
                 "draft_quantize": (str, type(None)),
                 "groupsize": (int, type(None))}


def _is_type(value: Any, kind: Union[type, tuple]) -> bool:
    if isinstance(value, bool):  # bool is an int subclass: only a bool field takes it
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _type_name(kind: Union[type, tuple]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list of strings",
             tuple: "a list of strings", type(None): "null"}
    return " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))


class RequestError(InvalidParam):
    """A bad request: HTTP 400 with {"error": message, "field": field} for that request alone."""

    def to_json(self) -> bytes:
        return json.dumps({"error": self.message, "field": self.field}).encode()


@dataclass
class GenerationRequest:
    prompt: str
    params: SamplingParams
    stream: bool


# Request fields and the JSON types they take (floats take integers too).
REQUEST_FIELDS = {"prompt": str, "max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float,
                  "seed": (int, type(None)), "stop": (str, list), "stream": bool, "speculate": bool}


def parse_request(body: Any, defaults: SamplingParams, max_seq_len: int) -> GenerationRequest:
    """Validate one request body: raw bytes, text, or what TorchServe already decoded from JSON."""
    if body is None or (isinstance(body, (bytes, bytearray, str)) and not body):
        raise RequestError("body", "empty body; send a JSON object (Content-Type: application/json)")
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError("body", f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError as e:
            raise RequestError("body", f"the request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise RequestError("body", f"the request body must be a JSON object, not {type(body).__name__}")
    if any(isinstance(value, (bytes, bytearray)) for value in body.values()):
        # Form fields (curl --data without a Content-Type): the form decoding has already mangled any JSON.
        raise RequestError("body", "got form fields; send the JSON object with Content-Type: application/json")
    for name, value in body.items():
        if name not in REQUEST_FIELDS:
            raise RequestError(name, f"unknown field (known: {', '.join(REQUEST_FIELDS)})")
        if not _is_type(value, REQUEST_FIELDS[name]):
            raise RequestError(name, f"must be {_type_name(REQUEST_FIELDS[name])}, got {json.dumps(value)[:80]}")
    prompt = body.get("prompt")
    if not prompt:
        raise RequestError("prompt", "a non-empty prompt string is required")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); text cannot hold them
        raise RequestError("prompt", "contains an unpaired surrogate (not valid Unicode)") from None
    max_new_tokens = body.get("max_new_tokens", defaults.max_new_tokens)
    if "max_new_tokens" in body and max_new_tokens > max_seq_len:
        raise RequestError("max_new_tokens", f"must be <= {max_seq_len} (the context length)")
    stop = _stop_strings(body["stop"], "stop") if "stop" in body else defaults.stop
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens,
                                temperature=float(body.get("temperature", defaults.temperature)),
                                top_k=body.get("top_k", defaults.top_k),
                                top_p=float(body.get("top_p", defaults.top_p)),
                                seed=body.get("seed"), stop=stop, speculate=body.get("speculate", True))
    except InvalidParam as e:
        raise RequestError(e.field, e.message) from None
    return GenerationRequest(prompt, params, body.get("stream", True))


def _stop_strings(value: Union[str, list], name: str) -> tuple[str, ...]:
    stop = [value] if isinstance(value, str) else value
    if not all(isinstance(s, str) and s for s in stop):
        raise RequestError(name, "must be a non-empty string or a list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(name, f"at most {MAX_STOP_STRINGS} stop strings")
    return tuple(stop)


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
    stream: bool
    arrived: float
    first_token_at: Optional[float] = None
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    text: list[str] = field(default_factory=list)  # accumulated for stream: false


# emit(metric name, value, **labels)
Emit = Callable[..., None]


class ServingLoop:
    """Maps the frontend's per-step batches onto Engine steps; all state is keyed by request id.

    Decoding runs on a background thread while TorchServe carries the replies to the clients and brings the
    next batch (~1.5 ms through its Java frontend on a 2-core CPU): it keeps stepping until the next call
    collects what it produced, so a small model decodes at engine speed, not at the frontend's round-trip
    rate. A call answers with what was decoded since the previous call; a new request's first reply is
    therefore empty (it carries the HTTP status and headers) unless the request is rejected.
    """

    def __init__(self, build_engine: Callable[[], Engine], defaults: SamplingParams,
                 emit: Emit = lambda name, value, **labels: None):
        # One thread does all of the engine's torch work: building it (loading weights), warm-up and every step.
        # CUDA graphs are recorded per thread, and so is CUDA's current device (which compiled graphs and NCCL
        # use). On CPU, a second thread that ran OpenMP regions leaves libgomp managing more threads than cores,
        # and it then stops spin-waiting between regions: the decode step ran ~20% slower (BENCHMARKS.md).
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.engine = self._engine_thread.submit(_build_on_device, build_engine).result()
        self.tokenizer, self.defaults, self.emit = self.engine.tokenizer, defaults, emit
        self.tracked: dict[str, _Tracked] = {}
        self._running: Optional[Future] = None  # the steps started by the previous call
        self._collecting = threading.Event()  # tells the running steps to finish
        self._active_slots = -1
        # Under tensor parallelism each step is a round of collectives: every rank must run the same steps.
        self._tensor_parallel = tp.world_size() > 1
        self._prefix_stats_sent = PrefixCacheStats()

    def warmup(self) -> None:
        self._engine_thread.submit(self.engine.warmup).result()

    def step(self, batch: list[tuple[str, Any]]) -> list[Reply]:
        """batch: (request id, body) per in-flight request, body None for one already seen. One Reply each."""
        self._collecting.set()  # the steps the previous call started end with the one in flight
        return self._engine_thread.submit(self._advance, batch).result()

    def _advance(self, batch: list[tuple[str, Any]]) -> list[Reply]:
        """On the engine thread, after the steps the previous call started."""
        try:
            return self._answer(batch)
        except BaseException:
            # The frontend fails and forgets every request of this call: free them all here too.
            for rid in list(self.tracked):
                self._cancel(rid)
            raise

    def _answer(self, batch: list[tuple[str, Any]]) -> list[Reply]:
        outputs, done = self._collect()
        # Under tensor parallelism every rank serves rank 0's batch. TorchServe 0.12 writes a call to the other
        # ranks asynchronously, possibly after rank 0's reply has marked a new request as delivered: they may
        # get it without its body.
        served = tp.rank0_object(batch) if self._tensor_parallel else batch
        present = {rid for rid, _ in served}
        for rid in [rid for rid in self.tracked if rid not in present]:
            self._cancel(rid)  # the frontend dropped it: the client went away
        replies = {out.request_id: self._reply(out, done) for out in outputs if out.request_id in self.tracked}
        now = time.perf_counter()
        for rid, body in served:
            if rid not in self.tracked and rid not in replies:
                try:
                    stream = self._admit(rid, body, now)
                    replies[rid] = Reply(b"", finished=False, first=True, content_type=TEXT if stream else JSON)
                except RequestError as e:
                    replies[rid] = Reply(e.to_json(), finished=True, first=True, status=400, content_type=JSON)
                    self.emit(REQUESTS_FINISHED, 1, reason="error")
        if self.engine.num_active != self._active_slots:
            self._active_slots = self.engine.num_active
            self.emit(ACTIVE_SLOTS, self._active_slots)
        if self.engine.prefix_cache is not None:
            self._emit_prefix_stats(self.engine.prefix_cache.stats)
        if self.engine.num_active:
            self._running = self._engine_thread.submit(self._engine_steps)
        # Requests still waiting for a slot have nothing to say yet. (Only rank 0's replies are sent.)
        return [replies.get(rid) or Reply(b"", finished=False, first=False) for rid, _ in batch]

    def _emit_prefix_stats(self, stats: PrefixCacheStats) -> None:
        """What changed since the last call (the engine thread is not running)."""
        sent = self._prefix_stats_sent
        for event, now, before in (("hit", stats.hit_blocks, sent.hit_blocks),
                                   ("miss", stats.miss_blocks, sent.miss_blocks),
                                   ("evicted", stats.evicted_blocks, sent.evicted_blocks)):
            if now > before:
                self.emit(PREFIX_CACHE_BLOCKS, now - before, event=event)
        if stats.saved_tokens > sent.saved_tokens:
            self.emit(PREFIX_CACHE_SAVED_TOKENS, stats.saved_tokens - sent.saved_tokens)
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

    def _admit(self, rid: str, body: Any, now: float) -> bool:
        """Validate and queue a new request; returns whether it streams."""
        request = parse_request(body, self.defaults, self.engine.max_seq_len)
        try:
            prompt_ids = self.tokenizer.encode(request.prompt, bos=True)
        except ValueError as e:  # text the tokenizer refuses
            raise RequestError("prompt", f"cannot be tokenized: {e}") from None
        try:
            self.engine.add(rid, prompt_ids, request.params)
        except PromptTooLongError as e:
            raise RequestError("prompt", str(e)) from None
        self.tracked[rid] = _Tracked(stream=request.stream, arrived=now)
        return request.stream

    def _reply(self, out: StepOutput, done: float) -> Reply:
        tracked = self.tracked[out.request_id]
        if out.token_ids and tracked.first_token_at is None:
            tracked.first_token_at = done
            self.emit(TIME_TO_FIRST_TOKEN, done - tracked.arrived)
        tracked.completion_tokens = out.completion_tokens
        tracked.draft_tokens, tracked.accepted_tokens = out.draft_tokens, out.accepted_tokens
        if out.finished:
            self._finish(out.request_id, out.finish_reason)
            if out.completion_tokens > 1:
                self.emit(INTER_TOKEN_LATENCY, (done - tracked.first_token_at) / (out.completion_tokens - 1))
        if tracked.stream:
            return Reply(out.text.encode(), finished=out.finished, first=False)
        # stream: false still needs a reply every step: empty ones until the whole answer at the end.
        tracked.text.append(out.text)
        if not out.finished:
            return Reply(b"", finished=False, first=False)
        usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                 "cached_tokens": out.cached_tokens}
        if self.engine.speculator:
            usage.update(draft_tokens=out.draft_tokens, accepted_tokens=out.accepted_tokens)
        answer = {"text": "".join(tracked.text), "finish_reason": out.finish_reason, "usage": usage}
        return Reply(json.dumps(answer).encode(), finished=True, first=False, content_type=JSON)

    def _cancel(self, rid: str) -> None:
        self.engine.cancel(rid)
        self._finish(rid, "cancelled")

    def _finish(self, rid: str, reason: str) -> None:
        # Counted per request, not per step: TorchServe logs and parses every metric line the worker prints,
        # which costs the frontend CPU time the decode step would otherwise have.
        tracked = self.tracked.pop(rid)
        self.emit(GENERATED_TOKENS, tracked.completion_tokens)
        self.emit(REQUESTS_FINISHED, 1, reason=reason)
        if tracked.draft_tokens:
            self.emit(ACCEPTANCE_RATE, tracked.accepted_tokens / tracked.draft_tokens)


def _build_on_device(build_engine: Callable[[], Engine]) -> Engine:
    engine = build_engine()
    if engine.device.type == "cuda":
        torch.cuda.set_device(engine.device)
    return engine
