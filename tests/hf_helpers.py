"""Builds tiny random transformers NemotronHForCausalLM checkpoints for parity tests (no hub access)."""

from __future__ import annotations

import numpy as np

TINY_BASE = dict(vocab_size=97, hidden_size=48, hybrid_override_pattern="M*-M-*M", num_attention_heads=6,
                 num_key_value_heads=2, head_dim=8, intermediate_size=80, mamba_num_heads=8, mamba_head_dim=6,
                 ssm_state_size=8, n_groups=2, chunk_size=8, layer_norm_epsilon=1e-5)


def build_hf_model(seed: int = 0, dt_bias_mean: float = -3.0, **overrides):
    """A random HF model whose every parameter (A_log, D, dt_bias, norms included) is perturbed away from its
    constant init, so a mapping or layout mistake cannot hide behind ones and zeros."""
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(TINY_BASE)
    kwargs.update(overrides)
    model = NemotronHForCausalLM(NemotronHConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 15 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 2 + dt_bias_mean)
            elif name.endswith(".D") or "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):   # steers expert choice; make it matter
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


TINY_MOE = dict(hybrid_override_pattern="ME*E-M", n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=24, moe_shared_expert_intermediate_size=40, routed_scaling_factor=1.0)


def save_hf_model(model, directory) -> str:
    model.save_pretrained(str(directory))
    return str(directory)


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """transformers' logits of one forward without a cache (use_cache=False: transformers 5.25's DynamicCache
    fails on a pattern whose first layer keeps no cache, e.g. 'ME*E-M')."""
    import torch

    with torch.no_grad():
        mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        return model(torch.from_numpy(ids).long(), attention_mask=mask, use_cache=False).logits.float().numpy()


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


BPE_CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
              "import numpy as np\nx = np.zeros(3)\n", "Paris is the capital of France."] * 20
BPE_SPECIALS = ["<pad>", "<s>", "</s>", "<think>", "</think>"]      # ids 0..4


def save_bpe_tokenizer(directory, chat_template: str | None = None) -> str:
    """A byte-level BPE tokenizer (300 tokens, specials BPE_SPECIALS first) saved as transformers saves one
    (tokenizer.json, tokenizer_config.json, and the chat template if given) into directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(BPE_CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=BPE_SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
    return str(directory)
