"""Tiny causal LMs built in code, so tests never touch the network and a training step takes milliseconds.

The saved folder looks like a real Hub checkpoint (config, safetensors weights, generation config, a
fast tokenizer with a ChatML chat template like SmolLM2's), so code under test loads it with the
ordinary `from_pretrained` calls it uses for real models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# Same order as SmolLM2, so ids 0/1/2 mean the same thing as in the real model.
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]

# SmolLM2-Instruct's template (read from its GGUF), default system prompt shortened.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

VOCAB_SIZE = 400

# Enough English and Python for BPE to learn common merges; the exact text only shapes the vocab.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Answer the question in one short sentence.",
    "Summarize the following text for a reader who is in a hurry.",
    "You are a helpful assistant. Please answer the user's question.",
    "The model was trained on a small data set and evaluated on held-out examples.",
    "A low-rank adapter adds two small matrices to each projection of the network.",
    "Translate the sentence into French: the cat sits on the mat.",
    "How many legs does a spider have? A spider has eight legs.",
    "Write a function that returns the sum of a list of numbers.",
    "def add(a, b):\n    return a + b\n",
    "def mean(xs):\n    if not xs:\n        return 0.0\n    return sum(xs) / len(xs)\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "with open('data.json') as f:\n    data = json.load(f)\n",
    "if __name__ == '__main__':\n    main()\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024.",
    "user assistant system question answer instruction input output response",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: any text encodes (no unknown tokens) and the vocab stays tiny."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        padding_side="right",
    )


def _config(arch: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, **overrides):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(intermediate_size=64, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; use 'llama' or 'gpt_neox'")


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model plus tokenizer in `path`; the same seed gives the same weights.

    `overrides` go into the model config (e.g. initializer_range=1.0 for a model whose logits can
    grow large enough to diverge under an absurd learning rate)."""
    path = Path(path)
    tokenizer = build_tokenizer()
    pad_id, bos_id, eos_id = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    config = _config(arch, len(tokenizer), pad_id, bos_id, eos_id, **overrides)
    # fork_rng: weight init must not depend on, or disturb, the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    # Greedy, explicit stop/pad ids: what a real instruct checkpoint ships, without sampling defaults.
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def downgrade_to_schema_2(db: Path) -> None:
    """Make a workspace database what loralab wrote before adapter ids (schema 2): the runs table
    without its adapter_id column and index, user_version 2."""
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        conn.execute("DROP INDEX ix_runs_adapter_id")
        conn.execute("ALTER TABLE runs DROP COLUMN adapter_id")
        conn.execute("PRAGMA user_version=2")
        conn.commit()
    finally:
        conn.close()
