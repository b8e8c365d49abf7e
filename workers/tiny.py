"""Tiny random causal LMs (Qwen2 or Llama architecture) with a tokenizer trained on the spot: what a
worker rehearses a kernel on (workers.warmup) where no copy of the job's model can be made, and what
the tests and the demo build their models from.

No hub access is needed: the tokenizer is a byte-level BPE trained on the given texts, and
the model is randomly initialised from a small config, saved as safetensors.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer with a ChatML template, as Qwen2's has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, intermediate: int = 128,
                heads: int = 4, kv_heads: int = 2, max_positions: int = 512):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown architecture {arch!r}")


def sample_texts() -> list[str]:
    """Mixed Chinese and English dialog snippets, enough to train a small BPE."""
    lines = [
        "发言人1: 您好，我是银行客服，您的账户存在风险，请把验证码告诉我。",
        "发言人2: 好的，那我们看一下其他投资者有没有什么问题。",
        "Caller: Your parcel is held at customs, pay the release fee by gift card today.",
        "Alice: Shall we meet for lunch on Friday near the office?",
        "客服: 您的快递丢失了，我们将为您理赔，请下载这个会议软件并共享屏幕。",
        "同事: 明天上午十点开会，记得带上季度报表。",
        "Agent: Congratulations, you won a prize; transfer the tax first to claim it.",
        "Bob: The train was late again, I will be there in ten minutes.",
    ]
    return [f"{line} {i}" for i in range(40) for line in lines]


def build_tiny_model(out_dir: Path, arch: str = "qwen2", seed: int = 0, dtype: str = "float32",
                     **config_overrides) -> Path:
    """Save a random `arch` model and its tokenizer to `out_dir` (safetensors) and return the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(sample_texts())
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_overrides)
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
