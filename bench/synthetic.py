"""Synthetic Dolci-shaped preference data and random-init models of the benchmark shapes.

Lengths are log-normal. `think` is fitted to the medians and 95th percentiles of allenai/Dolci-Think-DPO-7B: chosen
completions median 1,864 / p95 11,903 tokens, rejected 1,154 / 9,518, prompts median ~60 / p95 ~400 (the seed's
114 / 793 counted the prompt twice); its prompts are 2.3% of a pair's packed tokens (2P + C + R). `instruct` is fitted
to allenai/Dolci-Instruct-DPO as far as its published figures go (single-turn: 96% of its pairs): the prompt plus the
longer completion has a median of ~680 tokens (696 here) and the prompt is ~17% of a pair's packed tokens (16.8% here),
1,344 packed tokens per pair on average at max_length 4096. A log-normal with median m and p95 q has mu = ln m,
sigma = (ln q - ln m) / 1.645.
Each sequence (prompt + completion) is then cut to `max_length` by dropping the end of the completion, as
`sfm_dpo.data` does. Token ids are uniform random in [1, vocab) (never the pad/eos id 0, never all zeros).
"""

import math

import numpy as np

Z95 = 1.6448536269514722  # standard normal 95th percentile
SHAPES = {  # (median, p95) tokens of the prompt, chosen and rejected completions
    "think": {"prompt": (60, 400), "chosen": (1864, 11903), "rejected": (1154, 9518)},
    "instruct": {"prompt": (100, 900), "chosen": (330, 1300), "rejected": (300, 1200)},
}


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, p95: float, minimum: int = 1) -> np.ndarray:
    sigma = (math.log(p95) - math.log(median)) / Z95
    return np.maximum(minimum, np.round(rng.lognormal(math.log(median), sigma, n))).astype(np.int64)


def synthetic_lengths(
    n_pairs: int, max_length: int, seed: int = 0, max_prompt_length: int | None = None, shape: str = "think"
):
    """`(prompt, chosen, rejected)` token counts, shape (n_pairs,) each, after the per-sequence cap."""
    rng = np.random.default_rng(seed)
    stats = SHAPES[shape]
    prompt, chosen, rejected = (lognormal_lengths(rng, n_pairs, *stats[k]) for k in ("prompt", "chosen", "rejected"))
    prompt = np.minimum(prompt, max_prompt_length or max_length // 2)
    chosen = np.minimum(chosen, max_length - prompt)
    rejected = np.minimum(rejected, max_length - prompt)
    return prompt, chosen, rejected


def synthetic_dataset(n_pairs: int, vocab_size: int, max_length: int, seed: int = 0, shape: str = "think"):
    """A `datasets.Dataset` with `prompt_ids`, `chosen_ids`, `rejected_ids` (the columns `sfm_dpo.data` produces)."""
    from datasets import Dataset

    prompt, chosen, rejected = synthetic_lengths(n_pairs, max_length, seed, shape=shape)
    rng = np.random.default_rng(seed + 1)

    def ids(n):
        return rng.integers(1, vocab_size, int(n)).tolist()

    return Dataset.from_dict(
        {
            "prompt_ids": [ids(n) for n in prompt],
            "chosen_ids": [ids(n) for n in chosen],
            "rejected_ids": [ids(n) for n in rejected],
        }
    )


# Random-init shapes. N (parameters, embeddings and LM head included) is what MFU counts, as in ../shared/DEVICE.md.
ARCHS = {
    # The SFM layout at a size one H100 trains with stock TRL: GPT-NeoX, partial rotary, parallel residual.
    "gpt_neox_1.4b": dict(
        type="gpt_neox", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192,
        vocab_size=50304,
    ),
    # The real SFM shape (GPT-NeoX 6.86B).
    "gpt_neox_6.9b": dict(
        type="gpt_neox", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=16384,
        vocab_size=50304,
    ),
    # OLMo 3 layout, the 1.5B shape of DEVICE.md's reference numbers: sliding window 4096 on 3 of 4 layers.
    "olmo3_1.5b": dict(
        type="olmo3", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=8192,
        vocab_size=100278, sliding_window=4096,
    ),
    # OLMo 3 7B's shape.
    "olmo3_7b": dict(
        type="olmo3", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
        vocab_size=100278, sliding_window=4096,
    ),
    # CPU smoke test of the benchmark itself.
    "tiny_gpt_neox": dict(
        type="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=512,
    ),
    "tiny_olmo3": dict(
        type="olmo3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        vocab_size=512, sliding_window=64,
    ),
}  # fmt: skip


def model_config(arch: str):
    from transformers import GPTNeoXConfig, Olmo3Config

    spec = dict(ARCHS[arch])
    kind = spec.pop("type")
    common = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
                  max_position_embeddings=16384)  # fmt: skip
    if kind == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.25, use_parallel_residual=True, attention_bias=True, hidden_act="gelu",
                             **common, **spec)  # fmt: skip
    return Olmo3Config(num_key_value_heads=spec["num_attention_heads"], **common, **spec)


def build_model(arch: str, device, seed: int = 0, dtype=None):
    """Random-init model of `arch`, built directly on `device` in `dtype` (bf16 on the GPU: 6.86B in fp32 would not
    fit next to its copy), deterministic for a given seed and device. Attention: sdpa (the seed configuration)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(arch), dtype=dtype, attn_implementation="sdpa")
    return model


def attention_flops(lengths, config) -> float:
    """Forward attention FLOPs (QK^T and PV, causal, windowed layers counted with their window) of sequences of
    `lengths` tokens: 4 * head_dim * heads per (query, visible key) pair, per layer."""
    layers = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    per_pair = 4 * config.hidden_size  # heads * head_dim = hidden_size for these shapes
    total = 0.0
    for n in np.asarray(lengths, dtype=np.float64):
        full = n * (n + 1) / 2
        if window:
            w = min(window, n)
            windowed = w * (w + 1) / 2 + (n - w) * w
        else:
            windowed = full
        total += sum(per_pair * (windowed if t == "sliding_attention" else full) for t in layers)
    return total
