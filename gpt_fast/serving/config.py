"""The `handler:` section of model_config.yaml (HandlerConfig), and the engine it describes (build_engine)."""
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoints.load import DTYPES, load, load_model
from ..engine.engine import SPECULATE_MODES, Engine, default_max_seq_len
from ..engine.sampling import InvalidParam, SamplingParams
from ..model import tp
from ..model.args import quantization_scheme, scheme_name
from .fields import is_type, stop_strings, type_name

logger = logging.getLogger(__name__)


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
            section["stop"] = stop_strings(section["stop"], "handler.stop")
        config = cls(**section)
        if config.max_batch_size is None:
            config.max_batch_size = batch_size
        config.validate()
        return config

    def validate(self) -> None:
        for f in fields(self):
            kind = _CONFIG_TYPES.get(f.name, str)
            if not is_type(getattr(self, f.name), kind):
                raise ValueError(f"model_config.yaml handler.{f.name}: expected {type_name(kind)}, "
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



def build_engine(config: HandlerConfig, model_dir: Union[str, Path], gpu_id: Optional[int]) -> Engine:
    """Load the model (and draft) and build the engine: on the serving loop's engine thread.

    Under torchrun (parallelType: tp) this joins the ranks' process group, and each rank loads its shard.
    """
    device = tp.setup(config.torch_device(gpu_id))
    start = time.perf_counter()
    rank, world = tp.rank(), tp.world_size()
    model, tokenizer = load(config.checkpoint_path(model_dir), device, config.torch_dtype(), config.quantize,
                            config.groupsize, rank, world)
    draft = None
    if config.speculate == "draft":
        draft = load_model(config.draft_checkpoint_path(model_dir), device, config.torch_dtype(), rank, world,
                           quantize=config.draft_quantize)
    for name, m in (("model", model), ("draft", draft)):
        if m is not None:
            logger.info("%s: %s, %s", name, m.tok_embeddings.weight.dtype, scheme_name(m.args.quantization))
    logger.info("loaded in %.1f s on %s (tensor-parallel rank %d of %d), %d CPU threads; speculation: %s",
                time.perf_counter() - start, device, rank, world, torch.get_num_threads(), config.speculate or "off")
    compile_cache = config.compile_cache_path(model_dir)
    if compile_cache:  # read by inductor at each compile: kernels compiled by an earlier start are reused
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache)
    # Under tensor parallelism every rank must draw the same seeds for requests that bring none.
    return Engine(model, tokenizer, config.max_batch_size, config.max_seq_len or default_max_seq_len(model.args),
                  compile=config.compile, seed=tp.shared_seed(), prefix_cache_bytes=config.prefix_cache_bytes(),
                  speculate=config.speculate, speculate_k=config.speculate_k, draft_model=draft)
