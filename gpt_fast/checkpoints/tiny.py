"""Build the embedded default model: `python -m gpt_fast.tiny OUT_DIR` (a second or two on CPU, no network).

The tokenizer is a sentencepiece BPE trained on gpt_fast/data/tiny_corpus.txt. The weights are random, but
purely random logits have near-ties that flip between fp32 and bf16 (or eager and compiled), so a rule with large
margins is planted on top of the random matrices:

    next token = TABLE[row(current token), col(previous token)]

Layer 0's attention head 0 attends to the previous position only (its query and key read a constant direction
of the embeddings, and RoPE alone makes the score peak at distance 1) and copies that token's column code into
the residual stream; the output layer scores every cell of the table by its row code plus its column code. The
greedy continuation thus depends on the KV cache (the previous token), while the top-1 logit stays well above
the top-2 (by ~3 on average). Only ordinary pieces fill the table: the model never emits bos, eos, unk or
byte-fallback tokens.
"""
import io
import sys
from pathlib import Path

import sentencepiece as spm
import torch
from torch import Tensor

from ..model.args import ModelArgs
from ..model.layers import rope_inv_freq
from ..model.transformer import Transformer

CORPUS = Path(__file__).parent.parent / "data" / "tiny_corpus.txt"
GRID = 16
VOCAB_SIZE = 3 + 256 + GRID * GRID  # unk/bos/eos, the 256 byte-fallback pieces, the ordinary pieces (the table)

# Residual stream layout (dim=128): a constant, the row code, the own column code, the previous token's column
# code, then random per-token features in the remaining dims.
CONST, ROW, COL, PREV, FREE = 0, 1, 1 + GRID, 1 + 2 * GRID, 1 + 3 * GRID
FEATURE_NORM = 2.0  # norm of the random features (each planted code has norm 1)
ATTN_SCALE = 512.0  # sum over RoPE pairs of |q||k| for the previous-token head; see _positional_query_key
OUTPUT_SCALE = 1.0  # logit added per matching code: top-1 gets ~8, same row or column ~4
RANDOM_SCALE = 0.5  # the unplanted random matrices keep PyTorch's default init times this


def train_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB_SIZE,
        # Rare characters (most accents, CJK, emoji) are left to byte fallback, so tests see split characters.
        byte_fallback=True, character_coverage=0.99, split_digits=True,
        # Llama 2's normalizer settings: no NFKC, whitespace runs kept as they are.
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def ordinary_pieces(sp: spm.SentencePieceProcessor) -> list[int]:
    """The ids the table is filled with: every piece but unk/bos/eos and the byte-fallback pieces."""
    return [i for i in range(sp.vocab_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]


def _positional_query_key(args: ModelArgs) -> tuple[Tensor, Tensor]:
    """Constant q, k ([head_dim]) whose RoPE score is sum_i A_i cos((t - s - 1) theta_i), maximal at t - s = 1.

    Half the weight on the fastest pair, the rest spread over the next 11 keeps every other distance below
    2048 at least 0.21 * ATTN_SCALE lower (checked numerically for rope_base 10000, head_dim 32): ~19 nats
    after the 1/sqrt(head_dim) scaling, so the head attends to the previous token alone.
    """
    half = args.head_dim // 2
    amplitude = torch.zeros(half)
    amplitude[0] = 0.5
    amplitude[1:12] = 0.5 / 11
    amplitude = (amplitude * ATTN_SCALE).sqrt()
    theta = rope_inv_freq(args)
    # Pair i is dims (i, i + half), rotated by position * theta_i; k is pre-rotated by one step.
    q = torch.cat([amplitude, torch.zeros(half)])
    k = torch.cat([amplitude * theta.cos(), amplitude * theta.sin()])
    return q, k


def planted_weights(args: ModelArgs, ordinary_ids: list[int], random_scale: float = RANDOM_SCALE) -> dict[str, Tensor]:
    """The planted-rule weights for `args` (any depth and width with head_dim 32); random_scale scales the
    unplanted matrices (smaller keeps the rule dominant in deeper models)."""
    assert len(ordinary_ids) == GRID * GRID and FREE < args.dim
    torch.manual_seed(0)
    model = Transformer(args)
    vocab, dim, hd = args.vocab_size, args.dim, args.head_dim
    row, col = torch.randperm(vocab) % GRID, torch.randperm(vocab) % GRID
    table = torch.tensor(ordinary_ids)[torch.randperm(GRID * GRID)].view(GRID, GRID)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(random_scale)

        emb = model.tok_embeddings.weight
        features = emb[:, FREE:].clone()
        emb.zero_()
        emb[:, CONST] = 1.0
        emb[torch.arange(vocab), ROW + row] = 1.0
        emb[torch.arange(vocab), COL + col] = 1.0
        emb[:, FREE:] = FEATURE_NORM * features / features.norm(dim=1, keepdim=True)
        # Every row has the same norm, so RMSNorm scales every embedding by the same factor.
        norm_scale = dim ** 0.5 / emb[0].norm()

        # Layer 0, head 0 and its kv head 0: query and key read only the constant, so they are the same vectors
        # at every position up to RoPE's rotation; the values are the token's column code as a one-hot.
        wqkv = model.layers[0].attention.wqkv.weight
        k_row = args.n_head * hd
        v_row = k_row + args.n_kv_heads * hd
        q, k = _positional_query_key(args)
        wqkv[:hd] = 0.0
        wqkv[:hd, CONST] = q / norm_scale
        wqkv[k_row:k_row + hd] = 0.0
        wqkv[k_row:k_row + hd, CONST] = k / norm_scale
        wqkv[v_row:v_row + GRID] = 0.0
        wqkv[v_row + torch.arange(GRID), COL + torch.arange(GRID)] = 1.0 / norm_scale
        # wo writes head 0's output (the previous token's column one-hot) into PREV, and nothing else does.
        wo = model.layers[0].attention.wo.weight
        wo[PREV:PREV + GRID] = 0.0
        wo[PREV + torch.arange(GRID), torch.arange(GRID)] = 1.0

        # Table cell (r, c) scores its row code plus its column code.
        out = model.output.weight
        cells = table.flatten()
        out[cells, ROW + torch.arange(GRID).repeat_interleave(GRID)] += OUTPUT_SCALE
        out[cells, PREV + torch.arange(GRID).repeat(GRID)] += OUTPUT_SCALE
    return model.state_dict()


def build_tiny(out_dir: Path) -> Path:
    """Write tokenizer.model, model.pth (fp32) and config.json into out_dir; return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp = train_tokenizer(out_dir / "tokenizer.model")
    args = ModelArgs(dim=128, n_layer=2, n_head=4, n_kv_heads=2, head_dim=32, intermediate_size=344,
                     vocab_size=sp.vocab_size(), max_position_embeddings=2048, tokenizer="sentencepiece")
    torch.save(planted_weights(args, ordinary_pieces(sp)), out_dir / "model.pth")
    args.save(out_dir / "config.json")
    return out_dir


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m gpt_fast.tiny OUT_DIR")
    out_dir = build_tiny(Path(sys.argv[1]))
    for name in ("tokenizer.model", "model.pth", "config.json"):
        path = out_dir / name
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
