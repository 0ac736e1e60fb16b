"""ModelArgs: the model's shape and architecture options, read from the `config.json` the converter writes next to
the weights; the quantization schemes; named shapes for benchmarks with random weights."""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

QUANT_MODES = ("int8", "int4")
ROPE_TYPES = ("llama3", "linear", "longrope")
# Feed-forward gate activations (Hugging Face's names): SwiGLU, and GeGLU with the tanh GELU (Gemma).
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")
# The group sizes both int4 kernels accept (CUDA tinygemm and the CPU one).
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 128


def quantization_scheme(mode: str, groupsize: Optional[int] = None) -> dict:
    """The `quantization` entry of config.json for a mode; raises ValueError for what no kernel can run."""
    if mode == "int8":
        if groupsize is not None:
            raise ValueError("int8 has one scale per output channel; groupsize applies to int4 only")
        return {"mode": "int8"}
    if mode == "int4":
        groupsize = DEFAULT_INT4_GROUP_SIZE if groupsize is None else groupsize
        if groupsize not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 groupsize must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                             f"got {groupsize} (any of them fits every shape: inputs are padded to the group)")
        return {"mode": "int4", "groupsize": groupsize}
    raise ValueError(f"unknown quantization mode {mode!r} (supported: {', '.join(QUANT_MODES)})")


def scheme_name(scheme: Optional[dict]) -> str:
    """A short label: "int8", "int4-g128", or "unquantized"."""
    if scheme is None:
        return "unquantized"
    return "int8" if scheme["mode"] == "int8" else f"int4-g{scheme['groupsize']}"


@dataclass
class ModelArgs:
    dim: int
    n_layer: int
    n_head: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # HF-style rope_scaling dict ({"rope_type": "llama3" | "linear", ...}); None for plain RoPE.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    # Architecture options; the defaults are Llama's. Each is read once, when the layers are built.
    qkv_bias: bool = False  # a bias on the q, k and v projections (fused into wqkv's bias)
    qk_norm: bool = False  # an RMSNorm over each head's query and key before RoPE (Qwen3)
    rotary_dim: Optional[int] = None  # RoPE turns the first rotary_dim features of each head; None: all (Phi)
    hidden_act: str = "silu"  # the feed-forward's gate activation, one of HIDDEN_ACTS
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), in fp32 (Gemma)
    post_norms: bool = False  # the attention and feed-forward outputs are normalised too, before the residual adds
    scale_embeddings: bool = False  # embeddings times sqrt(dim), rounded to the model dtype (Gemma)
    attn_scale: Optional[float] = None  # the query scale; None: head_dim ** -0.5
    attn_softcap: Optional[float] = None  # attention logits -> cap * tanh(logits / cap) (Gemma 2)
    final_softcap: Optional[float] = None  # output logits -> cap * tanh(logits / cap) (Gemma 2)
    # Sliding-window attention: a token sees the keys of the last `sliding_window` positions (its own included), in
    # the layers listed in sliding_window_layers (None: every layer). The KV cache still keeps every position.
    sliding_window: Optional[int] = None
    sliding_window_layers: Optional[list] = None
    # Which tokenizer sits next to the weights: "sentencepiece" or "tiktoken" (tokenizer.model), or "huggingface"
    # (tokenizer.json with tokenizer_config.json and generation_config.json).
    tokenizer: str = "sentencepiece"
    # Extra stop ids (e.g. from generation_config.json); the tokenizer adds its own eos ids.
    stop_token_ids: list = field(default_factory=list)
    # Weight-only quantization of the Linear layers (see quantized.py), as written by quantization_scheme().
    quantization: Optional[dict] = None
    # Mixture of experts (Mixtral): the feed-forward is num_experts experts of intermediate_size each, of which
    # num_experts_per_tok run per token. 0: a dense feed-forward.
    num_experts: int = 0
    num_experts_per_tok: int = 0

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in (*ROPE_TYPES, "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim={self.rotary_dim} must be even and in 1..head_dim={self.head_dim}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (supported: {', '.join(HIDDEN_ACTS)})")
        if self.num_experts and self.hidden_act != "silu":
            raise ValueError("mixture-of-experts layers use silu")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts="
                             f"{self.num_experts}")
        if self.quantization is not None:
            extra = set(self.quantization) - {"mode", "groupsize"}
            if extra:
                raise ValueError(f"unknown quantization keys {sorted(extra)}")
            self.quantization = quantization_scheme(self.quantization.get("mode"), self.quantization.get("groupsize"))
            if self.num_experts and self.quantization["mode"] != "int8":
                raise ValueError("int4 is not implemented for mixture-of-experts models; use int8")

    @classmethod
    def load(cls, path: Path) -> "ModelArgs":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path} (run `python -m gpt_fast.convert` first)")
        data = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    def weight_bytes(self, dtype_bytes: float) -> float:
        """Bytes read per decoded token at batch 1 (all matrices; the embedding row read is negligible).

        dtype_bytes is the model dtype's size; quantized matrices count their own width plus their scales
        (int4: a bf16 scale and zero per group; int8's one scale per row is negligible). A mixture of experts
        counts the num_experts_per_tok experts a token runs and its router (never quantized), not every expert.
        """
        scheme = self.quantization or {}
        if scheme.get("mode") == "int8":
            bytes_per_param = 1.0
        elif scheme.get("mode") == "int4":
            bytes_per_param = 0.5 + 4 / scheme["groupsize"]
        else:
            bytes_per_param = dtype_bytes
        attn = self.dim * (self.n_head + 2 * self.n_kv_heads) * self.head_dim + self.n_head * self.head_dim * self.dim
        ffn = 3 * self.dim * self.intermediate_size * (self.num_experts_per_tok if self.num_experts else 1)
        out = self.dim * self.vocab_size
        router = self.n_layer * self.dim * self.num_experts * dtype_bytes
        return (self.n_layer * (attn + ffn) + out) * bytes_per_param + router


# Shapes for benchmarks with random weights (the converter reads real ones from config.json).
NAMED_SHAPES = {
    "stories110M": dict(dim=768, n_layer=12, n_head=12, n_kv_heads=12, head_dim=64, intermediate_size=2048,
                        vocab_size=32000),
    "llama-2-7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_heads=32, head_dim=128, intermediate_size=11008,
                       vocab_size=32000),
    "llama-3.1-8b": dict(dim=4096, n_layer=32, n_head=32, n_kv_heads=8, head_dim=128, intermediate_size=14336,
                         vocab_size=128256, rope_base=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         tokenizer="tiktoken"),
    "mixtral-8x7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_heads=8, head_dim=128, intermediate_size=14336,
                         vocab_size=32000, rope_base=1000000.0, max_position_embeddings=32768, num_experts=8,
                         num_experts_per_tok=2),
    "qwen2.5-7b": dict(dim=3584, n_layer=28, n_head=28, n_kv_heads=4, head_dim=128, intermediate_size=18944,
                       vocab_size=152064, norm_eps=1e-6, rope_base=1000000.0, max_position_embeddings=32768,
                       qkv_bias=True),
    "qwen3-8b": dict(dim=4096, n_layer=36, n_head=32, n_kv_heads=8, head_dim=128, intermediate_size=12288,
                     vocab_size=151936, norm_eps=1e-6, rope_base=1000000.0, max_position_embeddings=40960,
                     qk_norm=True),
    "gemma-2-9b": dict(dim=3584, n_layer=42, n_head=16, n_kv_heads=8, head_dim=256, intermediate_size=14336,
                       vocab_size=256000, norm_eps=1e-6, max_position_embeddings=8192, tie_embeddings=True,
                       hidden_act="gelu_pytorch_tanh", norm_unit_offset=True, post_norms=True, scale_embeddings=True,
                       attn_scale=256 ** -0.5, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                       sliding_window_layers=list(range(0, 42, 2))),
    "phi-3-mini": dict(dim=3072, n_layer=32, n_head=32, n_kv_heads=32, head_dim=96, intermediate_size=8192,
                       vocab_size=32064, max_position_embeddings=4096, sliding_window=2047),
    # Small shapes of those families for a 2-core CPU: two real ones (Qwen2.5-0.5B, Qwen3-0.6B), and Gemma 2 and
    # Phi-3 with their options at Qwen3-0.6B's size.
    "qwen2.5-0.5b": dict(dim=896, n_layer=24, n_head=14, n_kv_heads=2, head_dim=64, intermediate_size=4864,
                         vocab_size=151936, norm_eps=1e-6, rope_base=1000000.0, max_position_embeddings=32768,
                         tie_embeddings=True, qkv_bias=True),
    "qwen3-0.6b": dict(dim=1024, n_layer=28, n_head=16, n_kv_heads=8, head_dim=128, intermediate_size=3072,
                       vocab_size=151936, norm_eps=1e-6, rope_base=1000000.0, max_position_embeddings=40960,
                       tie_embeddings=True, qk_norm=True),
    "gemma-2-tiny": dict(dim=1024, n_layer=16, n_head=8, n_kv_heads=4, head_dim=128, intermediate_size=4096,
                         vocab_size=256000, norm_eps=1e-6, max_position_embeddings=8192, tie_embeddings=True,
                         hidden_act="gelu_pytorch_tanh", norm_unit_offset=True, post_norms=True,
                         scale_embeddings=True, attn_scale=128 ** -0.5, attn_softcap=50.0, final_softcap=30.0,
                         sliding_window=4096, sliding_window_layers=list(range(0, 16, 2))),
    "phi-3-tiny": dict(dim=1024, n_layer=16, n_head=16, n_kv_heads=16, head_dim=64, intermediate_size=4096,
                       vocab_size=32064, max_position_embeddings=4096, sliding_window=2047),
    # Llama 3.1's options (GQA 4:1, llama3 RoPE scaling) at a size that runs in seconds anywhere: smoke runs of the
    # benchmarks (scripts/gpu_check.sh --dry-run).
    "llama-tiny": dict(dim=256, n_layer=2, n_head=4, n_kv_heads=1, head_dim=64, intermediate_size=896,
                       vocab_size=4096, rope_base=500000.0, max_position_embeddings=131072,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       tokenizer="tiktoken"),
    # Mixtral's proportions (8 experts, top-2, GQA 4:1, I = 3.5 D) scaled down for a 2-core CPU (1.5 GB bf16).
    "mixtral-tiny": dict(dim=1024, n_layer=8, n_head=16, n_kv_heads=4, head_dim=64, intermediate_size=3584,
                         vocab_size=32000, rope_base=1000000.0, max_position_embeddings=32768, num_experts=8,
                         num_experts_per_tok=2),
}
