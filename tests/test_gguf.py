"""GGUF import: tensors of every supported type come back within their rounding, q/k rows come back from llama.cpp's
order, the tokenizer rebuilt from the metadata gives the original tokenizer's ids, the real SmolLM2 GGUF gives
transformers' greedy tokens, and what we cannot read is refused by name."""
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt_fast.arch import llama
from gpt_fast.checkpoints.gguf import convert_gguf, dequantize
from gpt_fast.checkpoints.load import load_model
from gpt_fast.engine.engine import Engine
from gpt_fast.engine.sampling import SamplingParams
from gpt_fast.model.args import ModelArgs
from gpt_fast.model.layers import rope_inv_freq
from gpt_fast.text.tokenizer import load_tokenizer

CORPUS = ["Hello world", " leading space", "In 2024, 12345 people paid $3.50.", "Ünïcödé façade naïve",
          "日本語のテキストです。", "Привет, мир!", "مرحبا بالعالم", "emoji 🙂👍🏽 family 👨‍👩‍👧",
          "tabs\tand\n\nnewlines   spaces  ", "x = [1, 2, 3]  # code\n    return x**2", "I'm don't we'll",
          "ÀÉÎ 한국어 ελληνικά", "<s> typed </s> markers"]

# Our names -> llama.cpp's (the fused wqkv is written as attn_q/k/v).
GGUF_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight", "attention.wo.weight": "attn_output.weight",
              "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
              "feed_forward.w2.weight": "ffn_down.weight", "attention_norm.weight": "attn_norm.weight",
              "ffn_norm.weight": "ffn_norm.weight"}
# Types the writer can quantize, given to the 2-D tensors in turn; with the largest error of one weight, as a
# fraction of its 32-block's largest magnitude (block types: one quantization step, rounding to nearest takes half).
ROUND_TRIP = {Q.F16: 2 ** -11, Q.BF16: 2 ** -8, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 8, Q.Q4_1: 2 / 15, Q.Q5_0: 1 / 16,
              Q.Q5_1: 2 / 31}


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q and k rows (pairs adjacent instead of half a head apart)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def split_name(name: str) -> tuple[str, str]:
    """Our name -> (llama.cpp's block prefix, the name within the block): ("blk.3.", "attention.wo.weight")."""
    if not name.startswith("layers."):
        return "", name
    _, layer, local = name.split(".", 2)
    return f"blk.{layer}.", local


def gguf_bytes(tensor: torch.Tensor, kind: Q) -> np.ndarray:
    """The tensor as stored in a GGUF file of type `kind` (zeros for types the writer cannot quantize)."""
    if kind == Q.F32:
        return tensor.numpy()
    if kind == Q.BF16:
        return tensor.bfloat16().view(torch.int16).numpy()
    try:
        return gguf.quants.quantize(tensor.numpy(), kind)
    except NotImplementedError:
        return np.zeros(gguf.quants.quant_shape_to_byte_shape(tensor.shape, kind), dtype=np.uint8)


def spm_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    types = []
    for i in range(sp.vocab_size()):
        types.append(gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
                     else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    return ([sp.id_to_piece(i) for i in range(sp.vocab_size())], [sp.get_score(i) for i in range(sp.vocab_size())],
            types)


def write_tiny_gguf(checkpoint: Path, path: Path, architecture: str = "llama", override: dict[str, Q] = {},
                    weight_types: tuple[Q, ...] = tuple(ROUND_TRIP)) -> dict[str, tuple[Q, torch.Tensor]]:
    """A checkpoint as a llama.cpp file: its sentencepiece vocabulary, q/k in llama.cpp's order (llama; qwen2 keeps
    Hugging Face's), the 2-D tensors stored as each of `weight_types` in turn (override: name -> type). Returns
    llama.cpp's name -> (type, original)."""
    args = ModelArgs.load(checkpoint / "config.json")
    state = torch.load(checkpoint / "model.pth", weights_only=True)
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layer)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.n_head)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_base)
    w.add_layer_norm_rms_eps(args.norm_eps)
    tokens, scores, types = spm_vocab(checkpoint / "tokenizer.model")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")

    written, cycle = {}, iter(list(weight_types) * 100)
    q_rows, kv_rows = args.n_head * args.head_dim, args.n_kv_heads * args.head_dim
    for name, tensor in state.items():
        prefix, local = split_name(name)
        if local.startswith("attention.wqkv."):
            kind = local.rsplit(".", 1)[1]  # weight or bias
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows])
            if architecture == "llama":
                q, k = llama_cpp_permute(q, args.n_head), llama_cpp_permute(k, args.n_kv_heads)
            parts = {f"attn_q.{kind}": q, f"attn_k.{kind}": k, f"attn_v.{kind}": v}
        else:
            parts = {GGUF_NAMES[local]: tensor}
        for gguf_local, part in parts.items():
            kind = Q.F32 if part.ndim == 1 else next(cycle)
            if part.ndim == 2 and part.shape[1] % 32 and kind not in (Q.F32, Q.F16, Q.BF16):
                kind = Q.F16  # block types need rows of whole 32-blocks (w2's 344 inputs are not)
            kind = override.get(prefix + gguf_local, kind)
            w.add_tensor(prefix + gguf_local, gguf_bytes(part, kind), raw_dtype=kind)
            written[prefix + gguf_local] = (kind, part)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint: Path, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(tiny_checkpoint, path)


def test_tensors_come_back_within_rounding(tiny_gguf, tiny_checkpoint: Path, tmp_path: Path) -> None:
    path, written = tiny_gguf
    assert {kind for kind, _ in written.values()} == {Q.F32, *ROUND_TRIP}
    convert_gguf(path, tmp_path, dtype=torch.float32)
    args = ModelArgs.load(tmp_path / "config.json")
    original = ModelArgs.load(tiny_checkpoint / "config.json")
    assert (args.dim, args.n_layer, args.n_head, args.n_kv_heads, args.head_dim, args.intermediate_size,
            args.vocab_size, args.norm_eps, args.rope_base, args.tie_embeddings) == \
        (original.dim, original.n_layer, original.n_head, original.n_kv_heads, original.head_dim,
         original.intermediate_size, original.vocab_size, original.norm_eps, original.rope_base, False)
    assert args.tokenizer == "huggingface" and args.stop_token_ids == [2]

    state = torch.load(tmp_path / "model.pth", weights_only=True)
    ours = {}
    for name, tensor in state.items():
        prefix, local = split_name(name)
        if local == "attention.wqkv.weight":
            q, k, v = tensor.split([args.n_head * args.head_dim] + [args.n_kv_heads * args.head_dim] * 2)
            # Compared in llama.cpp's order: the rounding happened there.
            ours.update({prefix + "attn_q.weight": llama_cpp_permute(q, args.n_head),
                         prefix + "attn_k.weight": llama_cpp_permute(k, args.n_kv_heads),
                         prefix + "attn_v.weight": v})
        else:
            ours[prefix + GGUF_NAMES[local]] = tensor
    assert set(ours) == set(written)
    for name, (kind, expected) in written.items():
        got = ours[name]
        assert got.dtype == torch.float32 and got.shape == expected.shape, name
        if kind == Q.F32:
            assert torch.equal(got, expected), name
            continue
        blocks = 32 if expected.shape[-1] % 32 == 0 else expected.shape[-1]
        scale = expected.reshape(-1, blocks).abs().amax(1, keepdim=True)
        if kind in (Q.F16, Q.BF16):
            scale = expected.reshape(-1, blocks).abs()
        error = (got - expected).reshape(-1, blocks).abs()
        assert (error <= ROUND_TRIP[kind] * scale * 1.01 + 1e-7).all(), (name, kind.name)
        assert (error > 0).any() or kind == Q.BF16, (name, kind.name)  # it was rounded, not passed through


def test_default_is_bf16_and_greedy_tokens_survive(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With everything in Q8_0 (planted margins are wide), the converted model continues like the original: the
    q/k rows are back in the order our RoPE expects."""
    path = tmp_path / "q8.gguf"
    written = write_tiny_gguf(tiny_checkpoint, path)
    write_tiny_gguf(tiny_checkpoint, path, override={n: Q.Q8_0 for n, (k, t) in written.items()
                                                     if t.ndim == 2 and t.shape[1] % 32 == 0})
    convert_gguf(path, tmp_path / "out")
    state = torch.load(tmp_path / "out" / "model.pth", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}

    tokenizer = load_tokenizer(tiny_checkpoint)
    prompts = [tokenizer.encode(p) for p in ("The capital of France", "Once upon a time", "a b c")]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)

    def greedy(checkpoint: Path) -> list[list[int]]:
        model = load_model(checkpoint, device="cpu", dtype=torch.float32)
        engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128)
        return [c.tokens for c in engine.generate(prompts, params)]

    assert greedy(tmp_path / "out") == greedy(tiny_checkpoint)


def test_sentencepiece_vocabulary_tokenizes_like_sentencepiece(tiny_gguf, tiny_checkpoint: Path,
                                                                 tmp_path: Path) -> None:
    path, _ = tiny_gguf
    convert_gguf(path, tmp_path)
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours.encode_special_tokens = True  # "<s>" typed in the text is text, as for sentencepiece
    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    for text in CORPUS + ["  two leading spaces", "\nnewline first"]:
        ids = ours.encode(text).ids
        assert ids == [1] + sp.encode(text), text
        assert ours.decode(ids) == text, text
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["add_bos_token"]) == \
        ("<s>", "</s>", "<unk>", True)
    assert config["chat_template"].startswith("{% for m in messages %}")
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [2]


def random_k_blocks(kind: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant blocks whose fp16 scales are finite, small numbers."""
    size = gguf.GGML_QUANT_SIZES[kind][1]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if kind == Q.Q6_K:
        blocks[:, 208:210] = scales[:, :2]  # d at the end
    else:
        blocks[:, 0:4] = scales  # d, dmin first
    return blocks


def half(block: np.ndarray, at: int) -> float:
    return float(block[at:at + 2].view(np.float16)[0])


def scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    """The 6-bit scale and min of sub-block j, packed in 12 bytes (llama.cpp's get_scale_min_k4)."""
    if j < 4:
        return int(q[j]) & 63, int(q[j + 4]) & 63
    return (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4), (int(q[j + 4]) >> 4) | ((int(q[j]) >> 6) << 4)


def reference_k(kind: Q, block: np.ndarray) -> list[float]:
    """One 256-weight block dequantized weight by weight, as llama.cpp's reference C code does."""
    y = [0.0] * 256
    if kind == Q.Q6_K:
        ql, qh, sc, d = block[:128], block[128:192], block[192:208].view(np.int8), half(block, 208)
        for n in range(2):
            for i in range(32):
                l_, h_, s = ql[64 * n:], qh[32 * n:], sc[8 * n:]
                parts = [(int(l_[i]) & 0xF) | ((int(h_[i]) >> 0 & 3) << 4), (int(l_[i + 32]) & 0xF) | ((int(h_[i]) >> 2 & 3) << 4),
                         (int(l_[i]) >> 4) | ((int(h_[i]) >> 4 & 3) << 4), (int(l_[i + 32]) >> 4) | ((int(h_[i]) >> 6 & 3) << 4)]
                for part, q in enumerate(parts):
                    y[128 * n + 32 * part + i] = d * int(s[i // 16 + 2 * part]) * (q - 32)
        return y
    d, dmin, scales = half(block, 0), half(block, 2), block[4:16]
    qh, qs = (block[16:48], block[48:176]) if kind == Q.Q5_K else (None, block[16:144])
    for j in range(4):
        for sub in range(2):
            sc, m = scale_min_k4(2 * j + sub, scales)
            for i in range(32):
                q = (int(qs[32 * j + i]) >> (4 * sub)) & 0xF
                if qh is not None and int(qh[i]) & (1 << (2 * j + sub)):
                    q += 16
                y[64 * j + 32 * sub + i] = d * sc * q - dmin * m
    return y


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_match_llama_cpp_reference(kind: Q, tmp_path: Path) -> None:
    """The gguf writer cannot make K-quants: random blocks (2 rows of 512 weights) against a weight-by-weight
    reference."""
    blocks = random_k_blocks(kind, 4, np.random.default_rng(int(kind)))
    path = tmp_path / "k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("t", blocks.reshape(2, -1), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    [tensor] = gguf.GGUFReader(path).tensors
    got = dequantize(tensor, torch.float32)
    expected = torch.tensor([v for b in blocks for v in reference_k(kind, b)]).reshape(2, 512)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-7)


def test_llama31_rope_freqs_become_rope_scaling() -> None:
    """llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors (rope_freqs.weight)."""
    metadata = {"llama.attention.head_count": 32, "llama.attention.head_count_kv": 8, "llama.embedding_length": 4096,
                "llama.block_count": 32, "llama.feed_forward_length": 14336, "llama.rope.freq_base": 500000.0,
                "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 131072}
    shapes = {"token_embd.weight": (128256, 4096), "output.weight": (128256, 4096), "rope_freqs.weight": (64,)}
    # The divisors as llama.cpp's converter computes them (factor 8, low 1, high 4, original context 8192).
    inv_freq = 1 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    wavelen = 2 * math.pi / inv_freq
    smooth = (8192 / wavelen - 1) / (4 - 1)
    divisors = torch.where(wavelen < 8192 / 4, 1.0, torch.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    config = llama.gguf_config(metadata, shapes, lambda name: divisors.float())
    args = llama.model_args(config)
    assert args.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    torch.testing.assert_close(rope_inv_freq(args), (inv_freq / divisors).float())
    with pytest.raises(ValueError, match="rope_freqs.weight is not Llama 3.1's"):
        llama.gguf_config(metadata, shapes, lambda name: (divisors ** 0.5).float())


def test_unsupported_files_are_refused_by_name(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "text.gguf"
    path.write_text("not a GGUF file\n")
    with pytest.raises(ValueError, match="text.gguf: not a readable GGUF file"):
        convert_gguf(path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"llama.expert_count=8, e.g. Mixtral\) is not supported"):
        llama.gguf_config({"llama.expert_count": 8}, {}, lambda name: None)

    path = tmp_path / "arch.gguf"
    write_tiny_gguf(tiny_checkpoint, path, architecture="mamba")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'mamba' \(supported: llama, qwen2\)"):
        convert_gguf(path, tmp_path / "out")

    path = tmp_path / "type.gguf"
    written = write_tiny_gguf(tiny_checkpoint, path)
    # An IQ4_NL tensor (zeros: it is refused before it is read).
    name = next(n for n, (k, t) in written.items() if t.ndim == 2 and t.shape[1] % 32 == 0)
    write_tiny_gguf(tiny_checkpoint, path, override={name: Q.IQ4_NL})
    result = subprocess.run([sys.executable, "-m", "gpt_fast.convert", str(path), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert f"unsupported GGUF tensor type IQ4_NL ({name})" in result.stderr
    assert not (tmp_path / "out").exists()


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf: Path):
    """transformers' tokenizer and fp32 model of the same GGUF file."""
    kw = dict(gguf_file=smollm2_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw).eval()
    return tokenizer, model


def test_smollm2_converts_with_its_tokenizer(smollm2_checkpoint: Path, smollm2_reference) -> None:
    reference, _ = smollm2_reference
    args = ModelArgs.load(smollm2_checkpoint / "config.json")
    assert (args.dim, args.n_layer, args.n_head, args.n_kv_heads, args.head_dim, args.intermediate_size,
            args.vocab_size, args.rope_base, args.norm_eps, args.tie_embeddings, args.stop_token_ids) == \
        (576, 30, 9, 3, 64, 1536, 49152, 100000.0, 1e-5, True, [2])
    ours = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    for text in CORPUS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        ids = reference.encode(text)
        assert ours.encode(text).ids == ids == auto.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    config = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                                  False)
    tokenizer = load_tokenizer(smollm2_checkpoint)
    assert not tokenizer.add_bos and tokenizer.stop_ids == {2}
    for chat in CHATS:
        assert auto.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
            reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert tokenizer.encode_chat(chat) == reference.apply_chat_template(chat, add_generation_prompt=True,
                                                                            tokenize=True, return_dict=False)


def test_smollm2_greedy_matches_transformers(smollm2_checkpoint: Path, smollm2_reference) -> None:
    """fp32 greedy tokens on three chat prompts equal transformers' until the end of the turn (<|im_end|>)."""
    reference, hf = smollm2_reference
    prompts = [reference.encode(reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for chat in CHATS]
    end_of_turn = reference.convert_tokens_to_ids("<|im_end|>")
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=48,
                              eos_token_id=end_of_turn)[0, len(prompt):].tolist()
            expected.append(out[:out.index(end_of_turn) + 1] if end_of_turn in out else out)
    model = load_model(smollm2_checkpoint, device="cpu", dtype=torch.float32)
    engine = Engine(model, load_tokenizer(smollm2_checkpoint), max_batch_size=4, max_seq_len=256)
    got = [c.tokens for c in engine.generate(prompts, SamplingParams(max_new_tokens=48, temperature=0.0))]
    assert got == expected
    assert reference.decode(got[0], skip_special_tokens=True).startswith("The capital of France is Paris")
