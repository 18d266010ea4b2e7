"""Our own arguments, beside TRL's `DPOConfig` and `ModelConfig`, and the settings derived from them.

One parser (`TrlParser((ScriptArguments, DPOConfig, ModelConfig))`): a recipe YAML sets the defaults, the command line
overrides any field. Checks that can fail run here, at start-up, before any model or data is loaded.
"""

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import trl
import yaml

from .run_identity import counts, variant_name

OVERLONG_POLICIES = ("truncate", "drop")


@dataclass
class ScriptArguments(trl.ScriptArguments):
    """TRL's dataset arguments (`dataset_name`, `dataset_config`, `dataset_train_split`, ...) plus ours."""

    effective_batch_size: int = field(
        default=128,
        metadata={
            "help": "Preference pairs per optimizer step, whatever the world size (OLMo 3: 128). gradient_accumulation_"
            "steps is derived from it, per_device_train_batch_size and the number of processes."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Prompts longer than this many tokens keep their END (as TRL 0.x did); the run counts them. TRL 1.x "
            "dropped this option, so our data step applies it."
        },
    )
    overlong_policy: str = field(
        default="truncate",
        metadata={
            "help": "Pairs whose prompt + longer completion exceeds max_length: 'truncate' the completions (OLMo 3's "
            "behaviour) or 'drop' the pair. Counted either way.",
            "choices": list(OVERLONG_POLICIES),
        },
    )
    skip_invalid_rows: bool = field(
        default=False,
        metadata={"help": "Skip malformed rows (counted by reason) instead of stopping with an error naming them."},
    )
    keep_degenerate_pairs: bool = field(
        default=False,
        metadata={
            "help": "Keep pairs whose chosen equals rejected. They carry no gradient (the real Dolci-Instruct data has "
            "some), so by default they are dropped and counted."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "'sfm' (SFM GPT-NeoX format), 'chatml' (OLMo 3) or a Jinja string. Default: the tokenizer's own; "
            "a tokenizer without one is an error."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of the training split (smoke tests, demos)."}
    )
    attn_backend: str = field(
        default="auto",
        metadata={
            "help": "Packed attention on the fast path (--padding_free true): auto (varlen, then flash_attention_2, "
            "flex, sdpa: the first that works here, probed at start-up and logged), or one of them.",
            "choices": ["auto", "varlen", "flash_attention_2", "flex", "sdpa"],
        },
    )
    max_tokens_per_microbatch: int | None = field(
        default=None,
        metadata={
            "help": "Fast path: token budget of one packed micro-batch per GPU. Each optimizer step still averages "
            "over exactly effective_batch_size pairs; gradient accumulation becomes the number of micro-batches the "
            "data needs. None: per_device_train_batch_size pairs per micro-batch, packed."
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "Fast path: torch.compile each decoder layer (fuses norms, rotary, activation and casts around the "
            "matmuls; sfm_dpo/kernels.py). Costs a minute of compilation at start-up, pays on GPUs: on an H100 +24-60%% "
            "training at 1.5B, +8%% training and +17%% reference pass at 6.86B with gradient checkpointing."
        },
    )
    share_prompt: bool = field(
        default=False,
        metadata={
            "help": "Fast path: compute each pair's prompt once; the rejected completion attends to the chosen "
            "sequence's prompt keys (sfm_dpo/packing.py). The same log-probs and gradients as unshared, a prompt's "
            "tokens fewer per pair, in training and in the reference pass. Needs the varlen, flex or sdpa attention "
            "backend (probed at start-up; off, with a warning, where it is not exact)."
        },
    )
    recompute_layers: str = field(
        default="auto",
        metadata={
            "help": "With gradient checkpointing on the fast path: how many decoder layers recompute their activations "
            "in the backward. 'auto' plans it from the GPU's memory, the ZeRO-2 state and the token budget (logged; "
            "sfm_dpo/recompute.py): at 6.86B on one H200, 7 of 32 layers trained 22%% faster than all; 'all' "
            "recomputes every layer (the safe choice, least memory); or a number of layers."
        },
    )
    ref_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Fast path: tokens per forward of the reference pass (no backward, so it can be larger). Default: "
            "4 x max_tokens_per_microbatch."
        },
    )
    ref_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Fast path with --precompute_ref_log_probs: where the reference log-probs are kept, keyed by the "
            "weights' content, precision, attention kernels and the exact token ids; shared by every run with equal "
            "inputs (resumed runs, the points of a sweep). Default: $SFM_REF_CACHE, else ref_cache beside output_dir "
            "(outputs/dpo -> outputs/ref_cache)."
        },
    )
    max_consecutive_nonfinite: int = field(
        default=10,
        metadata={"help": "Steps with a non-finite loss or gradient are skipped; this many in a row stop the run."},
    )
    eval_split_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Share of the preference pairs held out for evaluation (never trained on), chosen by a hash of each "
            "pair's content and --eval_split_seed, so the same data and seed give the same split whatever the other "
            "settings; recorded in <output_dir>/eval_split.json, which a resumed run reads back. Evaluated every "
            "--eval_steps (with --eval_strategy steps) and at the end. 0: no split."
        },
    )
    eval_split_seed: int | None = field(
        default=None, metadata={"help": "Seed of the held-out split (--eval_split_ratio). Default: --seed."}
    )

    def __post_init__(self):
        if self.dataset_name is None:
            raise ValueError("--dataset_name is required: a Hub dataset id, a .jsonl/.json/.parquet file or folder.")
        if self.effective_batch_size < 1:
            raise ValueError(f"--effective_batch_size must be positive, got {self.effective_batch_size}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"--max_prompt_length must be positive, got {self.max_prompt_length}.")
        if self.overlong_policy not in OVERLONG_POLICIES:
            raise ValueError(f"--overlong_policy must be one of {OVERLONG_POLICIES}, got {self.overlong_policy!r}.")
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 1:
            raise ValueError(f"--max_tokens_per_microbatch must be positive, got {self.max_tokens_per_microbatch}.")
        if self.ref_tokens_per_batch is not None and self.ref_tokens_per_batch < 1:
            raise ValueError(f"--ref_tokens_per_batch must be positive, got {self.ref_tokens_per_batch}.")
        if self.recompute_layers not in ("auto", "all") and not (
            self.recompute_layers.isdigit() and int(self.recompute_layers) >= 0
        ):
            raise ValueError(
                f"--recompute_layers must be auto, all or a number of layers, got {self.recompute_layers!r}."
            )
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"--max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}.")
        if not 0 <= self.eval_split_ratio < 1:
            raise ValueError(f"--eval_split_ratio must be in [0, 1), got {self.eval_split_ratio}.")


def make_parser() -> trl.TrlParser:
    """The one parser. No abbreviations: argparse would otherwise read a typo like `--learning_rat` as
    `--learning_rate`; unknown arguments fail (`fail_with_unknown_args=True`, TRL's default)."""
    return trl.TrlParser((ScriptArguments, trl.DPOConfig, trl.ModelConfig), allow_abbrev=False)


def gradient_accumulation_for(effective_batch_size: int, per_device_batch_size: int, world_size: int) -> int:
    """Accumulation steps so that one optimizer step sees exactly `effective_batch_size` pairs on `world_size`
    processes. Raises when that number is not reachable, rather than silently training with another batch."""
    pairs_per_micro_step = per_device_batch_size * world_size
    if effective_batch_size % pairs_per_micro_step:
        reachable = sorted({per_device_batch_size * world_size * k for k in (1, 2, 4, 8, 16, 32)})
        raise ValueError(
            f"An effective batch of {effective_batch_size} pairs is not reachable with per_device_train_batch_size="
            f"{per_device_batch_size} on {world_size} processes ({pairs_per_micro_step} pairs per micro-step). Change "
            f"--per_device_train_batch_size or the number of GPUs, or set --effective_batch_size to one of {reachable}."
        )
    return effective_batch_size // pairs_per_micro_step


def check_recipe(script_args: ScriptArguments, training_args, model_args) -> None:
    """Cross-field checks that no single dataclass can make; run before any expensive work."""
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required.")
    if training_args.max_length is None:
        raise ValueError("--max_length is required: unbounded pairs would not fit a GPU (Think pairs reach 16k+).")
    if script_args.max_prompt_length is not None and script_args.max_prompt_length >= training_args.max_length:
        raise ValueError(
            f"--max_prompt_length ({script_args.max_prompt_length}) must be smaller than --max_length "
            f"({training_args.max_length}), or no completion token would remain."
        )
    if (
        training_args.padding_free
        and script_args.max_tokens_per_microbatch is not None
        and script_args.max_tokens_per_microbatch < training_args.max_length * 2
    ):
        raise ValueError(
            f"--max_tokens_per_microbatch ({script_args.max_tokens_per_microbatch}) must hold the longest pair: "
            f"at least 2 x max_length = {training_args.max_length * 2} tokens (prompt + chosen, prompt + rejected)."
        )
    if training_args.truncation_mode != "keep_start":
        raise ValueError(
            f"--truncation_mode {training_args.truncation_mode} is not applied: our data step (sfm_dpo/data.py) keeps "
            "the start of overlong completions (--overlong_policy) and the end of long prompts (--max_prompt_length). "
            "Remove --truncation_mode."
        )
    if training_args.precompute_ref_log_probs and not training_args.padding_free:
        raise ValueError(
            "--precompute_ref_log_probs needs the fast path (--padding_free true): TRL's own precompute crashes under "
            "DeepSpeed ZeRO-2 (see sfm_dpo/ref_cache.py)."
        )
    if script_args.dataset_test_split != "test":  # TRL's field; its default names no split we would read
        raise ValueError(
            f"--dataset_test_split {script_args.dataset_test_split} is not read: the held-out pairs are drawn from "
            f"--dataset_train_split ({script_args.dataset_train_split}) by --eval_split_ratio, each pair by a hash of "
            "its content, the same in every run and resume (sfm_dpo/data.py). Remove --dataset_test_split."
        )
    if training_args.eval_strategy != "no" and not script_args.eval_split_ratio:
        raise ValueError(
            f"--eval_strategy {training_args.eval_strategy} needs held-out pairs: set --eval_split_ratio (e.g. 0.01)."
        )
    if training_args.push_to_hub and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. ORG/NAME-DPO).")
    if training_args.hub_token:
        # The Trainer would pickle it into training_args.bin in every checkpoint and the output folder.
        raise ValueError("hub_token is set in the recipe: remove it and put HF_TOKEN=... in .env (see .env.example).")


def model_short_name(model_name_or_path: str) -> str:
    """`ORG/NAME` or `/path/to/NAME` -> `NAME`."""
    return PurePosixPath(model_name_or_path.rstrip("/")).name


def cli_flags(argv: list[str]) -> set[str]:
    """Field names given on the command line (`--name value` or `--name=value`)."""
    return {m.group(1) for arg in argv if (m := re.match(r"--([A-Za-z0-9_]+)", arg))}


def recipe_changes(argv: list[str]) -> dict:
    """The settings of the run's identity (`sfm_dpo.run_identity.counts`) that the command line sets to values other
    than its recipe's (`--config`): {name: value}. Both sides go through the same argparse actions (the recipe's value
    as a default, the command line's as an argument), before any dataclass is built: a second TrainingArguments in a
    training process would reset accelerate's distributed state."""
    args = list(argv)
    if "--config" not in args:
        return {}
    at = args.index("--config")
    with open(args[at + 1]) as f:
        recipe = yaml.safe_load(f) or {}
    del args[at : at + 2]
    parser = make_parser()
    parser.set_defaults_with_config(**{k: v for k, v in recipe.items() if k != "env"})
    base, _ = parser.parse_known_args([])
    given, _ = parser.parse_known_args(args)
    as_list = lambda v: list(v) if isinstance(v, list | tuple) else [v]  # noqa: E731 - `--loss_type x` gives ["x"]
    return {
        name: value
        for name, value in sorted(vars(given).items())
        if counts(name) and as_list(value) != as_list(getattr(base, name, None))
    }


def _hub_name(text: str) -> str:
    """A Hub repo name: word characters, '-' and '.', no '--' or '..', at most 96 characters."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"-{2,}", "-", re.sub(r"[^\w.-]", "_", text))).strip("-.")
    return name if len(name) <= 96 else f"{name[:79]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"


def derive_run_names(training_args, argv: list[str], log) -> None:
    """Each variant of a recipe gets its own output folder and Hub repo. When the command line changes settings of
    the run's identity (`recipe_changes`), the run goes to `<recipe output_dir>/<variant>` (`variant_name`: e.g.
    `outputs/dpo/learning_rate-5e-07`, `outputs/dpo/NAME` for `--model_name_or_path ORG/NAME`) and pushes to
    `<hub_model_id>-<variant>` (`ORG/NAME-DPO` for a model), unless `--output_dir` / `--hub_model_id` are given. With no
    change the recipe's values stand. scripts/launch.sh calls this too, to print the output folder."""
    changes = recipe_changes(argv)
    variant = variant_name(changes)
    if variant is None:
        return
    flags = cli_flags(argv)
    changed = ", ".join(f"{k}={v}" for k, v in changes.items())
    if "output_dir" not in flags:
        training_args.output_dir = str(PurePosixPath(training_args.output_dir) / variant)
        log.info("Settings changed from the recipe (%s): output_dir -> %s", changed, training_args.output_dir)
    if "hub_model_id" not in flags and training_args.hub_model_id:
        owner, name = training_args.hub_model_id.split("/", 1) if "/" in training_args.hub_model_id else ("", "")
        model = changes.get("model_name_or_path")
        if model:
            org = model.split("/")[0] if "/" in model and not model.startswith(("/", ".")) else None
            owner, name = org or owner, f"{model_short_name(model)}-DPO"
        rest = variant_name({k: v for k, v in changes.items() if k != "model_name_or_path"})
        training_args.hub_model_id = f"{owner}/{_hub_name(name + (f'-{rest}' if rest else ''))}"
        log.info("Settings changed from the recipe (%s): hub_model_id -> %s", changed, training_args.hub_model_id)
