"""Tiny, locally built stand-ins for the real SFM assets: tokenizer, models and Dolci-shaped preference data.

Nothing here touches the network. `make demo` and the tests build everything with `build_demo_assets`; the shapes of
the generated rows are exactly those of the published Dolci samples (see `dolci_think_row`, `dolci_instruct_row`), so
the real loading code is what runs on them.
"""

import json
import random
from pathlib import Path

from .chat_templates import SFM_TEMPLATE

# The SFM GPT-NeoX tokenizer has bos = eos = pad = token 0; the tiny one keeps that trap on purpose.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
]
WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look more "
    "day could go come did number sound no most people my over know water than call first who may down side been "
    "now find any new work part take get place made live where after back little only round man year came show "
    "every good me give our under name very through just form sentence great think say help low line differ turn "
    "cause much mean before move right boy old too same tell does set three want air well also play small end put "
    "home read hand port large spell add even land here must big high such follow act why ask men change went light"
).split()
TOPICS = ["math", "code", "science", "history", "poetry", "logic", "geography", "cooking"]
# Dolci-Think-DPO-7B has 24 `dataset_source` values; the fixture uses 24 made-up ones of the same kind.
DATASET_SOURCES = [f"source_{i:02d}" for i in range(24)]
INSTRUCT_PREFERENCE_TYPES = ["llm_judged", "delta_learning", "multiturn_self_talk", "multiturn_synthetic_context"]
# Every Dolci-Instruct-DPO message dict has these 24 keys, nearly all null.
INSTRUCT_MESSAGE_KEYS = (
    "annotations audio content country created function_call hashed_ip header language openai_id reasoning_content "
    "redacted refusal role state system_fingerprint temperature timestamp token_counter tool_calls top_p toxic "
    "turn_identifier usage"
).split()
GOOD, BAD = "yes indeed, that is right.", "no idea, maybe wrong."


def _sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _lengths(rng: random.Random, scale: int) -> int:
    # Long-tailed, like real completion lengths (a few long pairs, many short ones).
    return max(1, int(rng.lognormvariate(0, 0.8) * scale))


def dolci_think_row(i: int, rng: random.Random, scale: int = 12) -> dict:
    """One row in the exact shape of allenai/Dolci-Think-DPO-7B. The preference is learnable: chosen answers end in
    GOOD, rejected ones in BAD."""
    topic = rng.choice(TOPICS)
    prompt = f"{topic}: {_sentence(rng, _lengths(rng, scale // 2))}?"

    def answer(tail: str) -> str:
        return f"<think> {_sentence(rng, _lengths(rng, scale))}\n</think>\n\n{_sentence(rng, _lengths(rng, scale // 2))} {tail}"

    return {
        "id": f"think-{i}",
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer(GOOD)}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer(BAD)}],
        "chosen_model": "model-big",
        "rejected_model": "model-small",
        "dataset_source": DATASET_SOURCES[i % len(DATASET_SOURCES)],
        "preference_type": "delta_learning" if i % 3 else "llm_judged",
    }


def _instruct_message(role: str, content: str, turn: int) -> dict:
    message = dict.fromkeys(INSTRUCT_MESSAGE_KEYS)
    message.update(
        role=role, content=content, header={"accept-language": None, "user-agent": None}, turn_identifier=turn
    )
    return message


def dolci_instruct_row(i: int, rng: random.Random, scale: int = 12, n_turns: int | None = None) -> dict:
    """One row in the exact shape of allenai/Dolci-Instruct-DPO: no `prompt`; chosen/rejected are full conversations
    of 24-key message dicts sharing all but the final assistant turn."""
    if n_turns is None:
        n_turns = 1 if i % 4 else rng.choice([2, 3, 4])
    shared = []
    for turn in range(n_turns - 1):
        shared.append(_instruct_message("user", f"{_sentence(rng, _lengths(rng, scale // 2))}?", turn))
        shared.append(_instruct_message("assistant", _sentence(rng, _lengths(rng, scale)), turn))
    shared.append(
        _instruct_message("user", f"{rng.choice(TOPICS)}: {_sentence(rng, _lengths(rng, scale // 2))}?", n_turns - 1)
    )
    body = _sentence(rng, _lengths(rng, scale))
    return {
        "prompt_id": f"instruct-{i}",
        "chosen": shared + [_instruct_message("assistant", f"{body} {GOOD}", n_turns - 1)],
        "rejected": shared + [_instruct_message("assistant", f"{body} {BAD}", n_turns - 1)],
        "chosen_model": "model-big",
        "rejected_model": "model-small",
        "preference_type": INSTRUCT_PREFERENCE_TYPES[0 if n_turns == 1 else 2 + i % 2],
    }


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def build_tiny_tokenizer(out_dir: Path | None = None, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the fixture's words, with the SFM chat template and bos = eos = pad = 0
    (`<|endoftext|>`), like the real SFM GPT-NeoX tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(WORDS), " ".join(TOPICS), GOOD, BAD, "? : , . \n"] * 4
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=16384,
    )
    fast.chat_template = SFM_TEMPLATE
    assert fast.bos_token_id == fast.eos_token_id == fast.pad_token_id == 0
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def tiny_config(arch: str, vocab_size: int, **overrides):
    """Tiny configs of the three layouts the fast path must be exact for. `gpt_neox` is the SFM layout (partial
    rotary 0.25, parallel residual, attention bias, untied embeddings, bos = eos = pad = 0); `olmo3` has sliding
    windows on 3 of 4 layers; `llama` is the plain Llama layout."""
    from transformers import GPTNeoXConfig, LlamaConfig, Olmo3Config

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    if arch == "gpt_neox":
        defaults = dict(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
            rotary_pct=0.25, use_parallel_residual=True, attention_bias=True, max_position_embeddings=16384,
        )  # fmt: skip
        config = GPTNeoXConfig(**{**defaults, **common, **overrides})
    elif arch == "olmo3":
        defaults = dict(
            hidden_size=16, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
            sliding_window=8, max_position_embeddings=16384,
        )  # fmt: skip
        config = Olmo3Config(**{**defaults, **common, **overrides})
    elif arch == "llama":
        defaults = dict(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
            max_position_embeddings=16384,
        )  # fmt: skip
        config = LlamaConfig(**{**defaults, **common, **overrides})
    else:
        raise ValueError(f"Unknown tiny architecture {arch!r}; expected gpt_neox, olmo3 or llama.")
    return config


def build_tiny_model(arch: str, vocab_size: int, out_dir: Path | None = None, seed: int = 0, **overrides):
    """A random-init causal LM of `tiny_config(arch)`, in float32, saved to `out_dir` when given."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size, **overrides), dtype=torch.float32)
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model


def build_demo_assets(root: Path, arch: str = "gpt_neox", n_rows: int = 256, seed: int = 0) -> dict[str, Path]:
    """Writes a tiny tokenizer + model (one folder, loadable by `--model_name_or_path`) and Dolci-shaped Think and
    Instruct data under `root`. Idempotent: existing assets are kept."""
    root = Path(root)
    paths = {
        "model": root / f"tiny-{arch}",
        "think": root / "data" / "dolci_think.jsonl",
        "instruct": root / "data" / "dolci_instruct.jsonl",
    }
    if not (paths["model"] / "config.json").exists():
        tokenizer = build_tiny_tokenizer(paths["model"])
        build_tiny_model(arch, vocab_size=len(tokenizer), out_dir=paths["model"], seed=seed)
    if not paths["think"].exists():
        rng = random.Random(seed)
        write_jsonl([dolci_think_row(i, rng) for i in range(n_rows)], paths["think"])
    if not paths["instruct"].exists():
        rng = random.Random(seed + 1)
        write_jsonl([dolci_instruct_row(i, rng) for i in range(n_rows)], paths["instruct"])
    return paths


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo_assets")
    for name, path in build_demo_assets(target).items():
        print(f"{name}: {path}")
