"""How long are the pairs, and what does each max_length and batching choice cost? Run it before spending GPU hours.

    python scripts/analyze_dataset.py                                   # allenai/Dolci-Instruct-DPO, Think recipe
    python scripts/analyze_dataset.py allenai/Dolci-Think-DPO-7B --recipe think --tokens_per_second 60000
    python scripts/analyze_dataset.py outputs/demo_assets/data/dolci_think.jsonl --recipe demo --max_lengths 128 192

It tokenizes exactly as train_dpo.py does (same loading, normalization, chat template, tokenizer and truncation code,
imported from sfm_dpo.data), so a bad row stops it with training's error. The recipe (configs/<recipe>.yaml) gives
the model whose tokenizer counts, max_length, max_prompt_length and batch sizes; flags override them. The SFM Think
and Instruct models share one tokenizer, so either recipe counts the same tokens.

Writes report.md, analysis.json, length_histogram.png and coverage.png to outputs/analysis/<dataset name>/ and prints
the report. `--num_samples N` analyses a seeded sample (epoch totals scaled up); `--tokens_per_second` (TRL's logged
num_tokens / train_runtime of a measured run) adds an epoch time per batching strategy.

Speed, measured here (2 shared CPU cores, the tiny BPE tokenizer of sfm_dpo.tiny) on 20,000 Dolci-Think-shaped pairs
built with `sfm_dpo.tiny.dolci_think_row(i, rng, scale=1200)` (pair length p50 6.1k, p99 19.4k, max 55k tokens; 9.7k
prompt + chosen + rejected tokens per pair, 684 MB of JSONL): 196 s with --num_proc 2, of which tokenizing 189 s
(1.3M tokens/s, 0.6-0.7M per process; the prompt is tokenized three times per pair, as training does), loading and
normalizing 7 s, all statistics 0.3 s. Extrapolated linearly to 150k such pairs on a 16-core node: 150k / 20k x 189 s
x 2 / 16 = 3 minutes of tokenizing plus about 25 s of single-process JSON loading, so 3-4 minutes (a Hub download
comes on top; 1 -> 2 processes gave 1.7x on this shared machine, so allow some slack). A re-run with the same data and
settings reuses datasets' cache and takes seconds.

Expected output on the demo data (`python -m sfm_dpo.tiny outputs/demo_assets`, then the third command above;
timings vary, and 21 of the 24 dataset_source rows are left out here):

    # Token lengths of outputs/demo_assets/data/dolci_think.jsonl

    - split `train`: 256 rows; 256 pairs analysed after normalization (0 invalid rows skipped, 0 pairs with chosen == rejected dropped)
    - tokenizer of `outputs/demo_assets/tiny-gpt_neox`, chat template: the tokenizer's own; recipe `demo`: max_length 256, max_prompt_length 128, overlong_policy truncate
    - batching: 4 pairs (8 sequences) per micro-batch x 4 processes x 1 accumulation = 16 pairs per optimizer step
    - 2.3 s with 2 processes before the report (tokenizer 0.0 s, load 0.1 s, normalize 0.8 s, tokenize 1.3 s, analyze 0.1 s)

    ## Lengths (tokens; pair = prompt + longer completion)

    |          | p50 | p90 | p95 | p99 | max | mean |
    |---------:|----:|----:|----:|----:|----:|-----:|
    |     pair |  85 | 135 | 158 | 213 | 220 |   92 |
    |   prompt |  20 |  42 |  56 |  86 |  91 |   24 |
    |   chosen |  48 |  87 | 115 | 166 | 201 |   56 |
    | rejected |  49 |  84 | 103 | 134 | 158 |   54 |

    Tokens: prompts 6.25k, chosen 14.25k, rejected 13.89k; the two sequences of every pair hold 40.64k (prompt twice). Prompts are 15.4% of those: computing the shared prefix once would save that much.

    ## Candidate max_length

    |   max_length | max_prompt | pairs <= max_length | prompts cut | completions cut | dropped | identical after cut | cut tokens mean / p95 | tokens lost | pairs used | epoch tokens | steps |
    |-------------:|-----------:|--------------------:|------------:|----------------:|--------:|--------------------:|----------------------:|------------:|-----------:|-------------:|------:|
    |          128 |         64 |               86.7% |           7 |              31 |       0 |                   0 |               28 / 86 |        2.8% |        256 |       39.57k |    16 |
    |          192 |        128 |               98.4% |           0 |               4 |       0 |                   0 |               20 / 28 |        0.2% |        256 |       40.56k |    16 |
    | 256 (recipe) |        128 |              100.0% |           0 |               0 |       0 |                   0 |                 0 / 0 |        0.0% |        256 |       40.64k |    16 |
    |         2048 |        128 |              100.0% |           0 |               0 |       0 |                   0 |                 0 / 0 |        0.0% |        256 |       40.64k |    16 |
    |         4096 |        128 |              100.0% |           0 |               0 |       0 |                   0 |                 0 / 0 |        0.0% |        256 |       40.64k |    16 |
    |         8192 |        128 |              100.0% |           0 |               0 |       0 |                   0 |                 0 / 0 |        0.0% |        256 |       40.64k |    16 |
    |        12288 |        128 |              100.0% |           0 |               0 |       0 |                   0 |                 0 / 0 |        0.0% |        256 |       40.64k |    16 |
    |        16384 |        128 |              100.0% |           0 |               0 |       0 |                   0 |                 0 / 0 |        0.0% |        256 |       40.64k |    16 |

    Recommended max_length for 95.0% of pairs whole: **192** (smallest candidate); exactly 158 tokens, 256 rounded to 256, 1024 to 1024.

    ## Padding overhead (padded tokens / real tokens, 4 pairs per micro-batch)

    | max_length | pad_to_max_length | random | group_by_length | sorted |  packed |
    |-----------:|------------------:|-------:|----------------:|-------:|--------:|
    |        128 |             65.6% |  50.9% |           16.5% |  14.7% |   29.4% |
    |        192 |            142.3% |  64.0% |           20.0% |  16.7% |   12.7% |
    |        256 |            222.5% |  65.2% |           21.2% |  17.0% |   19.7% |
    |       2048 |           2479.9% |  65.2% |           21.2% |  17.0% |   61.2% |
    |       4096 |           5059.8% |  65.2% |           21.2% |  17.0% |  222.5% |
    |       8192 |          10219.6% |  65.2% |           21.2% |  17.0% |  545.0% |
    |      12288 |          15379.4% |  65.2% |           21.2% |  17.0% |  867.5% |
    |      16384 |          20539.2% |  65.2% |           21.2% |  17.0% | 1190.0% |

    At max_length 256, micro-batches (forward passes) per epoch of the pairs analysed:
    - pad_to_max_length: 64 (pad every sequence to max_length)
    - random: 64 (pad to the longest of a random micro-batch (stock TRL))
    - group_by_length: 64 (transformers' group_by_length sampler (sorted mega-batches))
    - sorted: 64 (micro-batches of length-sorted pairs (ideal grouping))
    - packed: 95 (each step's pairs packed first-fit-decreasing into rows of pack_tokens, unused room counted as padding)
    - packed rows hold pack_tokens = 512 tokens; a padding-free packed forward computes none of their unused room, which then only costs more rows.

    ## Epoch

    40.64k sequence tokens per epoch at max_length 256, 16 optimizer steps.
    Pass --tokens_per_second (TRL's num_tokens / train_runtime of a measured run) for a time estimate.

    ## By dataset_source (coverage at max_length 256)

    | dataset_source | pairs | share | pair p50 | pair p95 | pair max |    fit | tokens share | prompt share |
    |---------------:|------:|------:|---------:|---------:|---------:|-------:|-------------:|-------------:|
    |      source_00 |    11 |  4.3% |       82 |       91 |       91 | 100.0% |         3.7% |        16.1% |
    |      source_01 |    11 |  4.3% |       93 |      131 |      131 | 100.0% |         4.4% |        15.3% |
    |      source_02 |    11 |  4.3% |       83 |      114 |      114 | 100.0% |         4.1% |        15.7% |
    | ... 21 more sources ...

    ## By preference_type (coverage at max_length 256)

    | preference_type | pairs | share | pair p50 | pair p95 | pair max |    fit | tokens share | prompt share |
    |----------------:|------:|------:|---------:|---------:|---------:|-------:|-------------:|-------------:|
    |  delta_learning |   170 | 66.4% |       89 |      151 |      220 | 100.0% |        67.2% |        15.6% |
    |      llm_judged |    86 | 33.6% |       79 |      160 |      214 | 100.0% |        32.8% |        15.0% |

    Wrote outputs/analysis/dolci_think/report.md, .../analysis.json, .../length_histogram.png, .../coverage.png
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package
from sfm_dpo.versions import ANALYSIS, require_supported

require_supported(ANALYSIS)  # before the heavy imports: an unsupported Python or package is one line with the fix
import numpy as np
import yaml

from sfm_dpo.analysis import LengthSettings, analyze, candidate_lengths, count_arrays, count_tokens, write_report
from sfm_dpo.chat_templates import resolve_chat_template
from sfm_dpo.config import ScriptArguments
from sfm_dpo.data import DataReport, InvalidDataError, load_preference_rows, normalize_dataset

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


def str_to_bool(value: str) -> bool:
    """transformers' HfArgumentParser reading of a bool flag's value (`transformers.hf_argparser.string_to_bool`)."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


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
        if kind is bool:  # as train_dpo.py's parser takes them: `--flag`, `--flag true`, `--flag false`
            parser.add_argument(
                f"--{name}", type=str_to_bool, nargs="?", const=True, default=None, help="default: the recipe's"
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
    timings = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - start - sum(timings.values()), 2)

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

    lap("tokenizer")
    raw = load_preference_rows(args.dataset, args.dataset_config, args.dataset_split)
    rows_read = len(raw)
    if args.num_samples is not None and args.num_samples < rows_read:
        picked = np.sort(np.random.default_rng(args.seed).choice(rows_read, args.num_samples, replace=False))
        raw = raw.select(picked.tolist())
        logger.info("Analysing a seeded sample of %d of %d rows (--num_samples).", len(raw), rows_read)
    lap("load")
    report = DataReport(source=args.dataset)
    normalized = normalize_dataset(
        raw, report, args.skip_invalid_rows, args.keep_degenerate_pairs, num_proc=args.num_proc
    )
    lap("normalize")
    counted = count_tokens(normalized, tokenizer, settings, num_proc=args.num_proc)
    arrays = count_arrays(counted, settings)
    lap("tokenize")
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
    lap("analyze")
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
        "timings_s": timings,
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
    try:
        main(parse_args())
    except InvalidDataError as error:  # its message names every bad row and the way out: a traceback adds nothing
        logger.error("%s", error)
        sys.exit(1)
