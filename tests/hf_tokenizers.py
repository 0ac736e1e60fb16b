"""Tiny tokenizer.json tokenizers trained on the fly with `tokenizers`, written as transformers' save_pretrained lays
a checkpoint's tokenizer out (tokenizer.json, tokenizer_config.json, generation_config.json)."""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from gpt_fast.checkpoints.tiny import CORPUS

# SmolLM2-135M-Instruct's template (ChatML with a default system prompt), as its GGUF metadata holds it.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Accented, Cyrillic, whitespace and code lines besides the tiny corpus, so merges cover more than English (CJK and
# emoji stay split into bytes or byte pieces: the detokenizer tests need split characters).
EXTRA_LINES = ["Grüße aus Köln, ça va très bien, señor.", "Привет, как дела?", "tabs\tand  double  spaces",
               "def f(x):\n    return x * 2\n"]


def _lines() -> list[str]:
    return [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()] + EXTRA_LINES


def _write(directory: Path, tokenizer: Tokenizer, config: dict, eos_token_id) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 "clean_up_tokenization_spaces": False, **config}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
    return directory


def byte_level(directory: Path, vocab_size: int = 400, chat_template: str = CHATML) -> Path:
    """GPT-2 style byte-level BPE as SmolLM2 has it: ChatML special tokens, no bos added, <|im_end|> ends a turn;
    plus `<think>`, an added token that is not special (Qwen3 has such)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_tokens(["<think>"])
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|im_end|>", "chat_template": chat_template}
    return _write(directory, tokenizer, config, eos_token_id=[2, 0])


def _byte_fallback_bpe(tokenizer: Tokenizer, vocab_size: int, pre_tokenizer) -> Tokenizer:
    """Train a sentencepiece-style BPE (merges within words, as sentencepiece's), then give it `pre_tokenizer` and
    the <0x00>..<0xFF> pieces byte fallback decodes to."""
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tokenizer.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        limit_alphabet=100))  # rare characters (accents, CJK, emoji) are left to byte fallback
    tokenizer.pre_tokenizer = pre_tokenizer
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"].update(byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    return Tokenizer.from_str(json.dumps(spec))


def metaspace(directory: Path, vocab_size: int = 300) -> Path:
    """Mistral-style: a Metaspace pre-tokenizer (a prefix space on the first word), byte fallback, and bos added by
    tokenizer.json's post-processor (tokenizer_config.json does not say add_bos_token)."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer = _byte_fallback_bpe(tokenizer, vocab_size, pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first", split=False))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens(["[INST]", "[/INST]"])
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
                "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
                "{% endfor %}")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": template}
    return _write(directory, tokenizer, config, eos_token_id=2)


def llama2_legacy(directory: Path, vocab_size: int = 300) -> Path:
    """Llama 2's tokenizer.json: sentencepiece's rules as a normalizer (prefix "▁", spaces to "▁"), no
    pre-tokenizer; bos added by the post-processor and by tokenizer_config.json's add_bos_token alike."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer = _byte_fallback_bpe(tokenizer, vocab_size, None)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False}
    return _write(directory, tokenizer, config, eos_token_id=2)
