"""Tiny models for tests: a word-level vocabulary and a 2-layer Llama, saved as a model folder."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<pad>", "<eos>", "yes", "sure", "no", "maybe", "red", "blue", "one", "two", "cat",
         "dog", "sun", "moon", "up", "down"]


def build_word_model(path: Path):
    """A 16-word tokenizer and a random 2-layer Llama in ``path``; returns (path, tokenizer).
    initializer_range 0.2 gives logits wide enough that a LoRA can concentrate the policy."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=0, tie_word_embeddings=True,
                         initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(path)
    return path, tokenizer


def build_chat_llama(path: Path, *, hidden: int = 64, intermediate: int = 128, max_positions: int = 512,
                     initializer_range: float = 0.02) -> Path:
    """A random 2-layer Llama with the embedded model's tokenizer (and so its chat template)."""
    from actors.models import load_tokenizer

    tok = load_tokenizer("embedded")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=initializer_range, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
