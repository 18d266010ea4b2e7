"""How long are the pairs, and what does each max_length and batching choice cost? Run it before spending GPU hours.

    python scripts/analyze_dataset.py                                   # allenai/Dolci-Instruct-DPO, Think recipe
    python scripts/analyze_dataset.py allenai/Dolci-Think-DPO-7B --recipe think --tokens_per_second 60000
    python scripts/analyze_dataset.py outputs/demo_assets/data/dolci_think.jsonl --recipe demo --max_lengths 128 192

It tokenizes exactly as train_dpo.py does (same loading, normalization, chat template, tokenizer and truncation code,
imported from sfm_dpo.data), so a bad row stops it with training's error. The recipe (configs/<recipe>.yaml) gives
the model whose tokenizer counts, max_length, max_prompt_length and batch sizes; flags override them. The SFM Think
and Instruct models share one tokenizer, so either recipe counts the same tokens.

Writes report.md, analysis.json, length_histogram.png and coverage.png to outputs/analysis/<dataset name>/ and prints
the report. Speed: TODO.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

from sfm_dpo.analysis import LengthSettings, analyze, candidate_lengths, count_arrays, count_tokens, write_report  # noqa: E402
from sfm_dpo.chat_templates import resolve_chat_template  # noqa: E402
from sfm_dpo.config import ScriptArguments  # noqa: E402
from sfm_dpo.data import DataReport, load_preference_rows, normalize_dataset  # noqa: E402

logger = logging.getLogger("analyze_dataset")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = "allenai/Dolci-Instruct-DPO"
RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
# Fields read from the recipe, each overridable by the flag of the same name.
RECIPE_FIELDS = {
    "model_name_or_path": str,
    "chat_template": str,
    "dataset_config": str,
    "max_length": int,
    "max_prompt_length": int,
    "overlong_policy": str,
    "per_device_train_batch_size": int,
    "effective_batch_size": int,
    "skip_invalid_rows": bool,
    "keep_degenerate_pairs": bool,
    "seed": int,
}
DEFAULTS = {  # ScriptArguments' own defaults, for fields a recipe leaves out
    "chat_template": None,
    "dataset_config": None,
    "max_prompt_length": ScriptArguments.max_prompt_length,
    "overlong_policy": ScriptArguments.overlong_policy,
    "effective_batch_size": ScriptArguments.effective_batch_size,
    "skip_invalid_rows": False,
    "keep_degenerate_pairs": False,
    "per_device_train_batch_size": 4,
    "seed": 42,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "dataset", nargs="?", default=DEFAULT_DATASET, help=f"Hub id or local file/folder (default {DEFAULT_DATASET})"
    )
    parser.add_argument(
        "--recipe", default="think", choices=RECIPES, help="configs/<recipe>.yaml gives the defaults (default think)"
    )
    parser.add_argument("--dataset_split", default="train")
    for name, kind in RECIPE_FIELDS.items():
        if kind is bool:
            parser.add_argument(
                f"--{name}", action=argparse.BooleanOptionalAction, default=None, help="default: the recipe's"
            )
        else:
            parser.add_argument(f"--{name}", type=kind, default=None, help="default: the recipe's")
    parser.add_argument(
        "--max_lengths", type=int, nargs="+", default=[], help="candidates beyond 2048 4096 8192 12288 16384"
    )
    parser.add_argument(
        "--coverage", type=float, default=0.95, help="share of pairs a recommended max_length keeps whole"
    )
    parser.add_argument(
        "--world_size", type=int, default=4, help="training processes (GPUs), for accumulation (default 4)"
    )
    parser.add_argument("--pack_tokens", type=int, default=None, help="packing row budget (default 2 x max_length)")
    parser.add_argument(
        "--tokens_per_second", type=float, default=None, help="measured sequence tokens/s of the whole job"
    )
    parser.add_argument(
        "--num_samples", type=int, default=None, help="analyse a seeded sample of N rows (default all)"
    )
    parser.add_argument(
        "--num_proc", type=int, default=os.cpu_count(), help="tokenization processes (default all cores)"
    )
    parser.add_argument("--output_dir", default=None, help="default outputs/analysis/<dataset name>")
    args = parser.parse_args(argv)
    with open(REPO / "configs" / f"{args.recipe}.yaml") as f:
        recipe = yaml.safe_load(f) or {}
    for name in RECIPE_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, recipe.get(name, DEFAULTS.get(name)))
    if args.model_name_or_path is None or args.max_length is None:
        parser.error(f"configs/{args.recipe}.yaml sets no model_name_or_path or max_length; pass them.")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error(f"--num_samples must be positive, got {args.num_samples}.")
    if args.output_dir is None:
        name = Path(args.dataset.rstrip("/")).name
        args.output_dir = str(
            REPO
            / "outputs"
            / "analysis"
            / (Path(name).stem if Path(name).suffix in (".jsonl", ".json", ".parquet") else name)
        )
    return args


def main(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    logger.info("Arguments: %s", vars(args))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    resolve_chat_template(tokenizer, args.chat_template, logger)
    settings = LengthSettings(
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        overlong_policy=args.overlong_policy,
        candidates=candidate_lengths(args.max_length, args.max_lengths),
        keep_degenerate_pairs=args.keep_degenerate_pairs,
    )
    for length in settings.candidates:
        if settings.prompt_limit(length) != args.max_prompt_length:
            logger.info("At max_length %d, max_prompt_length %s (the recipe's %s would not fit).", length,
                        settings.prompt_limit(length), args.max_prompt_length)  # fmt: skip

    raw = load_preference_rows(args.dataset, args.dataset_config, args.dataset_split)
    rows_read = len(raw)
    if args.num_samples is not None and args.num_samples < rows_read:
        picked = np.sort(np.random.default_rng(args.seed).choice(rows_read, args.num_samples, replace=False))
        raw = raw.select(picked.tolist())
        logger.info("Analysing a seeded sample of %d of %d rows (--num_samples).", len(raw), rows_read)
    report = DataReport(source=args.dataset)
    normalized = normalize_dataset(
        raw, report, args.skip_invalid_rows, args.keep_degenerate_pairs, num_proc=args.num_proc
    )
    counted = count_tokens(normalized, tokenizer, settings, num_proc=args.num_proc)
    arrays = count_arrays(counted, settings)
    result = analyze(
        arrays,
        settings,
        per_device_batch=args.per_device_train_batch_size,
        world_size=args.world_size,
        effective_batch=args.effective_batch_size,
        coverage_target=args.coverage,
        pack_tokens=args.pack_tokens,
        tokens_per_second=args.tokens_per_second,
        scale=rows_read / len(raw),
        seed=args.seed,
    )
    skipped = sum(report.invalid_rows_skipped.values())
    meta = {
        "dataset": args.dataset,
        "split": args.dataset_split,
        "rows_read": rows_read,
        "rows_sampled": len(raw),
        "normalization": f"{skipped} invalid rows skipped, {report.degenerate_pairs_dropped} pairs with chosen == "
        f"rejected dropped",
        "model": args.model_name_or_path,
        "chat_template": args.chat_template or "the tokenizer's own",
        "recipe": args.recipe,
        "num_proc": args.num_proc,
        "elapsed_s": time.perf_counter() - start,
        "data_report": vars(report),
    }
    written = write_report(arrays, result, meta, args.output_dir, args.coverage)
    print(written["text"])
    print("Wrote " + ", ".join(str(p) for p in written["paths"].values()))
    return {"result": result, "meta": meta, "paths": written["paths"]}


if __name__ == "__main__":
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    main(parse_args())
