"""Stock TRL DPOTrainer (seed configuration) against this repo's fast path, same GPU, model and data.

    python bench/bench_dpo.py --arch olmo3_1.5b            # both paths, one JSON + a Markdown row in --out
    python bench/bench_dpo.py --arch tiny_gpt_neox --pairs 24 --steps 3 --warmup-steps 1   # CPU smoke test
    python bench/bench_dpo.py --shape instruct --max-length 4096 --paths stock,fast,fast_shared

Each path runs in its own process (clean peak memory, nothing shared): first stock, then fast. The parent prints a
table, checks that both give the same loss on the same first batch, and writes `--out/<date>_<arch>_<gpu>.json`.

- stock: `trl.DPOTrainer` as TRL ships it (only `_prepare_dataset` skipped: the data is already tokenized), reference
  model kept, per-device batch 4 pairs x accumulation 8, max_length 8192, gradient checkpointing, sdpa, bf16.
- fast: `sfm_dpo.fast_trainer.FastDPOTrainer` (packed rows of `--token-budget` tokens, no pad token) after a reference
  pass through `sfm_dpo.ref_cache` with `sfm_dpo.packing.reference_logps_fn`; the reference model is not kept. The
  pass is timed (`ref_pass_s`) and counted in the fast path's throughput: combined tokens/s = 1 / (train s/token +
  reference-pass s/token).
- fast_shared: the fast path with shared prompts (`share_prompt=True`: each pair's prompt computed once, in the
  reference pass and in training). Its tokens/s count the tokens as the data holds them (prompt once per sequence, as
  stock computes them), so that the rates compare; its MFU counts the tokens it computes.

MFU (../shared/DEVICE.md): 6N FLOPs per real policy token + 2N per real reference token, N = all parameters,
against 989 TFLOP/s (H100 dense bf16); padding and activation recompute not counted. Attention FLOPs (causal,
windowed layers at their window) are reported apart. Steps: `--warmup-steps` optimizer steps untimed, then
`--steps` timed, each the wall time between two `on_step_end` callbacks after `torch.cuda.synchronize()`.
"""

import argparse
import contextlib
import copy
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
LN2 = math.log(2)
PROBE_PAIRS = 4  # the "same first batch": the stock micro-batch size
FAST_PATHS = ("fast", "fast_shared")


def record_suffix(path: str) -> str:
    """The suffix of a fast path's comparison keys in the record: none for `fast` (the keys earlier results have)."""
    return "" if path == "fast" else f"_{path}"


# --------------------------------------------------------------------------------------------------------------------
# Shared by both paths
# --------------------------------------------------------------------------------------------------------------------


def dpo_config(args, output_dir: str, fast: bool):
    """The seed configuration (configs/think.yaml), with only what a benchmark must change: no saving, no W&B, a fixed
    number of steps, and for the fast path padding_free + precomputed reference + its own checkpointing choice."""
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available() and not args.cpu
    return DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        max_length=args.max_length,
        loss_type=["sigmoid_norm"],
        beta=5.0,
        learning_rate=1e-6,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_steps=args.warmup_steps + args.steps,
        bf16=cuda,
        use_cpu=not cuda,
        activation_checkpointing=args.fast_grad_ckpt if fast else True,
        padding_free=fast,
        precompute_ref_log_probs=fast,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        disable_tqdm=True,
        dataloader_num_workers=2 if fast else 0,  # the recipes' value; stock: the seed configuration's
    )


class StepTimer:
    """TrainerCallback: wall time and real tokens of each optimizer step (synchronized clock)."""

    def __init__(self, counter: dict):
        self.counter, self.times, self.tokens, self.computed, self.pairs = counter, [], [], [], []

    def _now(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.times.append(now - self.last)
        self.tokens.append(int(self.counter["tokens"]))  # tensors summed on the device: read once a step, synced
        self.computed.append(int(self.counter["computed"]) or self.tokens[-1])  # stock: counted in `tokens` only
        self.pairs.append(int(self.counter["pairs"]))
        self.counter["tokens"] = self.counter["computed"] = self.counter["pairs"] = 0
        self.last = now

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def probe_rows(dataset, vocab_size: int):
    """The first PROBE_PAIRS rows with fixed, model-independent reference log-probs: per completion token ln(1/V)
    shifted by a seeded uniform +-0.3, so that beta * delta lands where the loss is sensitive and a wrong sum or
    normalization in either path would show."""
    import numpy as np

    rng = np.random.default_rng(123)
    rows = []
    for row in dataset.select(range(PROBE_PAIRS)):
        row = {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for column, completion in (("ref_chosen_logps", "chosen_ids"), ("ref_rejected_logps", "rejected_ids")):
            row[column] = float(len(row[completion]) * (-math.log(vocab_size) + rng.uniform(-0.3, 0.3)))
        rows.append(row)
    return rows


def summarize(timer: StepTimer, warmup: int, n_params: int, attn_flops_per_token: float) -> dict:
    import numpy as np

    times = np.asarray(timer.times[warmup:])
    tokens = int(sum(timer.tokens[warmup:]))
    computed = int(sum(timer.computed[warmup:]))
    pairs = int(sum(timer.pairs[warmup:]))
    seconds = float(times.sum())
    return {
        "timed_steps": len(times),
        "step_times_s": [round(float(t), 4) for t in timer.times],
        "step_time_spread": {
            "min": float(times.min()),
            "median": float(np.median(times)),
            "max": float(times.max()),
            "cv": float(times.std() / times.mean()),
        },  # fmt: skip
        "timed_seconds": seconds,
        "timed_tokens": tokens,
        "timed_computed_tokens": computed,
        "timed_pairs": pairs,
        "train_tokens_per_s": tokens / seconds,
        "train_samples_per_s": pairs / seconds,
        "n_params": n_params,
        "attn_flops_per_token_fwd": attn_flops_per_token,
    }


def peak_memory_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# The two paths (each in its own process)
# --------------------------------------------------------------------------------------------------------------------


def run_stock(args, dataset, model, tokenizer, counter, timer) -> dict:
    import torch
    from trl import DPOTrainer

    class StockDPOTrainer(DPOTrainer):
        """trl.DPOTrainer as shipped; the data is already tokenized, and each training forward's real tokens are
        counted (attention_mask: the pad tokens are not real)."""

        def _prepare_dataset(self, dataset, *a, **k):
            return dataset

        def _compute_loss(self, model, inputs, return_outputs):
            if model.training:
                counter["tokens"] += inputs["attention_mask"].sum()
                counter["pairs"] += inputs["input_ids"].shape[0] // 2
            return super()._compute_loss(model, inputs, return_outputs)

    ref_model = copy.deepcopy(model).eval()
    with tempfile.TemporaryDirectory() as out:
        trainer = StockDPOTrainer(model=model, ref_model=ref_model, args=dpo_config(args, out, fast=False),
                                  train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])  # fmt: skip
        probe = probe_stock(trainer, dataset, args)
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        trainer.train()
    return {"probe": probe, "reference": "model kept (TRL ref_model)", "attn_implementation": "sdpa",
            "gradient_checkpointing": True, "micro_batches_per_step": 8}  # fmt: skip


@contextlib.contextmanager
def _eval_no_grad(trainer):
    import torch

    model = trainer.model
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), trainer.accelerator.autocast():
            yield
    finally:
        model.train(was)


def _to_device(batch, device):
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def probe_stock(trainer, dataset, args) -> dict:
    """Stock TRL's own code on the probe pairs: policy log-probs (`compute_ref_log_probs` run on the policy), the loss
    with the fixed reference values, and the step-0 loss with its reference model (ln 2: policy == reference)."""
    rows = probe_rows(dataset, trainer.model.config.vocab_size)
    device = trainer.accelerator.device
    with _eval_no_grad(trainer):
        plain = _to_device(trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                                  for r in rows]), device)  # fmt: skip
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, plain)
        step0 = trainer._compute_loss(trainer.model, plain, False)
        trainer.precompute_ref_logps = True  # read the fixed reference columns, as TRL does when precomputed
        try:
            fixed = trainer._compute_loss(trainer.model, _to_device(trainer.data_collator(rows), device), False)
        finally:
            trainer.precompute_ref_logps = False
    return {"policy_chosen_logps": chosen.float().tolist(), "policy_rejected_logps": rejected.float().tolist(),
            "loss_fixed_ref": float(fixed), "loss_step0": float(step0)}  # fmt: skip


def run_fast(args, dataset, model, tokenizer, counter, timer, share_prompt: bool = False) -> dict:
    # Swap point: the fast path under test. Everything else in this function is set-up and measurement.
    import torch
    from accelerate import PartialState
    from trl.trainer.utils import add_fused_lm_head

    from sfm_dpo import ref_cache
    from sfm_dpo.attention import apply_backend, select_backend
    from sfm_dpo.fast_path import REF_BUDGET_FACTOR
    from sfm_dpo.fast_trainer import FastDPOTrainer as FastTrainer
    from sfm_dpo.kernels import compile_decoder_layers
    from sfm_dpo.packing import dataset_pair_tokens, pack_pairs, packed_logps, reference_logps_fn

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")

    # Reference pass, timed: the same backend and fused head the trainer will use, under the same autocast.
    backend = select_backend(args.attn_backend, device, torch.bfloat16 if cuda else torch.float32)
    apply_backend(model, backend)
    add_fused_lm_head(model)
    if args.compile_layers:
        compile_decoder_layers(model)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else None
    ref_budget = args.ref_token_budget or REF_BUDGET_FACTOR * args.token_budget
    compute_fn = reference_logps_fn(model, device, max_tokens=ref_budget, context=autocast, share_prompt=share_prompt)
    start = _sync_now()
    if args.compile_layers:  # compile the no-grad graph outside the timed pass: once per run, not per token
        compute_fn([{k: dataset[0][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    compile_s = _sync_now() - start
    start = _sync_now()
    with tempfile.TemporaryDirectory() as cache:
        dataset = ref_cache.load_or_compute(dataset, compute_fn, cache, {"bench": args.arch, "seed": args.seed},
                                            PartialState(cpu=not cuda), token_budget=ref_budget)  # fmt: skip
    ref_pass_s = _sync_now() - start
    ref_peak = peak_memory_gib()

    class TimedFastTrainer(FastTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            if model.training:  # tokens as the data holds them (prompt once per sequence), and those computed
                weights = inputs["pair_weights"]
                counter["tokens"] += (inputs["sequence_tokens"] * weights.repeat_interleave(2)).sum()
                counter["computed"] += (weights[inputs["sequence_index"] // 2] > 0).sum()
                counter["pairs"] += (weights > 0).sum()
            return super()._compute_loss(model, inputs, return_outputs)

    callbacks = [timer]
    if args.fast_grad_ckpt:  # the planner train_dpo.py uses (sfm_dpo.recompute), on this GPU's memory
        from sfm_dpo.recompute import RecomputePlanCallback

        recompute = RecomputePlanCallback(args.recompute_layers, args.token_budget)
        callbacks.append(recompute)
    with tempfile.TemporaryDirectory() as out:
        trainer = TimedFastTrainer(model=model, args=dpo_config(args, out, fast=True), train_dataset=dataset,
                                   processing_class=tokenizer, callbacks=callbacks, attn_backend=backend,
                                   max_tokens_per_microbatch=args.token_budget, share_prompt=share_prompt)  # fmt: skip
        rows = probe_rows(dataset, model.config.vocab_size)
        cached = [{**r, "ref_chosen_logps": dataset[i]["ref_chosen_logps"],
                   "ref_rejected_logps": dataset[i]["ref_rejected_logps"]} for i, r in enumerate(rows)]  # fmt: skip

        def packed(probe):
            return _to_device(pack_pairs(probe, share_prompt=share_prompt), trainer.accelerator.device)

        with _eval_no_grad(trainer):
            chosen, rejected, _, _ = packed_logps(trainer.model, packed(rows))
            fixed = trainer._compute_loss(trainer.model, packed(rows), False)
            step0 = trainer._compute_loss(trainer.model, packed(cached), False)
        torch.cuda.reset_peak_memory_stats() if cuda else None
        trainer.train()
        micro = trainer.batch_sampler.microbatches_per_step
    ref_tokens = sum(dataset_pair_tokens(dataset))
    ref_computed = sum(dataset_pair_tokens(dataset, share_prompt=share_prompt))
    return {
        "probe": {"policy_chosen_logps": chosen.float().tolist(), "policy_rejected_logps": rejected.float().tolist(),
                  "loss_fixed_ref": float(fixed), "loss_step0": float(step0)},
        "reference": "precomputed (sfm_dpo.ref_cache, packed forward), not kept",
        "ref_pass_s": ref_pass_s, "ref_pass_tokens": ref_tokens, "ref_pass_computed_tokens": ref_computed,
        "ref_pass_pairs": len(dataset), "share_prompt": share_prompt,
        "ref_pass_peak_mem_gib": ref_peak, "attn_implementation": backend,
        "gradient_checkpointing": args.fast_grad_ckpt,
        "recomputed_layers": recompute.recomputed if args.fast_grad_ckpt else None,
        "token_budget": args.token_budget,
        "compile_layers": args.compile_layers, "ref_compile_s": compile_s, "ref_token_budget": ref_budget,
        "micro_batches_per_step": micro,
    }  # fmt: skip


def _sync_now():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def child(args) -> None:
    """One path, in this process; writes its JSON to args.child_out."""
    import torch
    from synthetic import ARCHS, attention_flops, build_model, synthetic_dataset

    from sfm_dpo.tiny import build_tiny_tokenizer

    cuda = torch.cuda.is_available() and not args.cpu
    vocab = ARCHS[args.arch]["vocab_size"]
    dataset = synthetic_dataset(args.pairs, vocab, args.max_length, seed=args.seed, shape=args.shape)
    start = time.perf_counter()
    model = build_model(args.arch, "cuda" if cuda else "cpu", seed=args.seed)
    load_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    lengths = [len(p) + len(c) for p, c in zip(dataset["prompt_ids"], dataset["chosen_ids"])] + [
        len(p) + len(r) for p, r in zip(dataset["prompt_ids"], dataset["rejected_ids"])
    ]
    attn_per_token = attention_flops(lengths, model.config) / sum(lengths)
    counter = {"tokens": 0, "computed": 0, "pairs": 0}
    timer = StepTimer(counter)
    if args.child == "stock":
        extra = run_stock(args, dataset, model, build_tiny_tokenizer(), counter, timer)
    else:
        extra = run_fast(args, dataset, model, build_tiny_tokenizer(), counter, timer, args.child == "fast_shared")
    result = {**summarize(timer, args.warmup_steps, n_params, attn_per_token), **extra,
              "peak_mem_gib": peak_memory_gib(), "model_init_s": load_s}  # fmt: skip
    if "ref_pass_peak_mem_gib" in result:
        result["peak_mem_gib"] = max(result["peak_mem_gib"], result["ref_pass_peak_mem_gib"])
    Path(args.child_out).write_text(json.dumps(result, indent=1))


# --------------------------------------------------------------------------------------------------------------------
# Parent: run both, compare, report
# --------------------------------------------------------------------------------------------------------------------


def finish(path: str, r: dict, peak_flops: float) -> dict:
    """samples/s, real tokens/s, MFU (8N per real token: 6N policy + 2N reference), reference pass counted. Real
    tokens are the data's (prompt once per sequence); MFU counts the tokens computed, fewer with shared prompts."""
    n = r["n_params"]
    train_computed = r["timed_computed_tokens"] / r["timed_tokens"]  # computed per data token, 1 unless shared
    if path.startswith("fast"):
        train_s_per_token = 1 / r["train_tokens_per_s"]
        ref_s_per_token = r["ref_pass_s"] / r["ref_pass_tokens"]
        tokens_per_s = 1 / (train_s_per_token + ref_s_per_token)
        samples_per_s = 1 / (1 / r["train_samples_per_s"] + r["ref_pass_s"] / r["ref_pass_pairs"])
        r["ref_pass_tokens_per_s"] = r["ref_pass_tokens"] / r["ref_pass_s"]
        ref_computed = r["ref_pass_computed_tokens"] / r["ref_pass_tokens"]
        flops_per_token = 6 * n * train_computed + 2 * n * ref_computed
    else:
        tokens_per_s, samples_per_s = r["train_tokens_per_s"], r["train_samples_per_s"]
        flops_per_token = 8 * n
    r["real_tokens_per_s"] = tokens_per_s
    r["samples_per_s"] = samples_per_s
    r["mfu"] = flops_per_token * tokens_per_s / peak_flops
    # Attention: 3x forward for the policy (forward + backward), 1x for the reference.
    r["attn_tflops_per_s"] = 4 * r["attn_flops_per_token_fwd"] * tokens_per_s / 1e12
    r["mfu_with_attention"] = r["mfu"] + r["attn_tflops_per_s"] * 1e12 / peak_flops
    return r


def versions() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
         "trl": trl.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__,
         "cuda": torch.version.cuda}  # fmt: skip
    try:
        v["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True).stdout.strip() or None  # fmt: skip
    except OSError:
        v["git"] = None
    return v


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"


def compare(stock: dict, fast: dict) -> dict:
    """Same first batch, same loss: the probe losses with fixed reference values, the step-0 losses (ln 2 when the
    reference is the policy), and the policy's per-token mean log-probs of the 8 probe sequences."""
    import numpy as np

    ps, pf = stock["probe"], fast["probe"]
    s = np.asarray(ps["policy_chosen_logps"] + ps["policy_rejected_logps"])
    f = np.asarray(pf["policy_chosen_logps"] + pf["policy_rejected_logps"])
    return {
        "loss_fixed_ref": {"stock": ps["loss_fixed_ref"], "fast": pf["loss_fixed_ref"],
                           "abs_diff": abs(ps["loss_fixed_ref"] - pf["loss_fixed_ref"])},
        "loss_step0": {"stock": ps["loss_step0"], "fast": pf["loss_step0"], "ln2": LN2},
        "policy_logps_max_rel_diff": float(np.max(np.abs(s - f) / np.abs(s))),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="olmo3_1.5b")
    parser.add_argument("--paths", default="stock,fast", help="comma list of stock,fast,fast_shared")
    parser.add_argument("--shape", default="think", choices=["think", "instruct"], help="synthetic length shape")
    parser.add_argument("--pairs", type=int, default=None, help="default: 32 x (warmup + steps)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--ref-token-budget", type=int, default=None, help="default 4 x --token-budget")
    parser.add_argument("--fast-grad-ckpt", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--recompute-layers", default="all", help="with --fast-grad-ckpt: all, N, or auto (planned)")
    parser.add_argument("--attn-backend", default="auto")
    parser.add_argument("--compile-layers", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--loss-tol", type=float, default=0.02, help="max |stock - fast| probe loss (bf16)")
    parser.add_argument(
        "--step0-tol",
        type=float,
        default=None,
        help="max |step-0 loss - ln 2|; default 1e-3 on the CPU (fp32), 1e-2 on a GPU (bf16: the "
        "reference pass and the first training forward round differently, ~0.004 at 6.86B)",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--child", choices=["stock", *FAST_PATHS], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.pairs = args.pairs or 32 * (args.warmup_steps + args.steps)
    if args.step0_tol is None:
        import torch

        args.step0_tol = 1e-2 if torch.cuda.is_available() and not args.cpu else 1e-3
    if args.child:
        child(args)
        return 0

    command = " ".join([Path(sys.executable).name, *sys.argv])
    results, errors = {}, {}
    work = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    for path in args.paths.split(","):
        out = work / f"{path}.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", path, "--child-out", str(out)]
        print(f"== {path}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.exists():
            errors[path] = f"exit code {proc.returncode}"
            print(f"!! {path} failed ({errors[path]})", flush=True)
            continue
        results[path] = finish(path, json.loads(out.read_text()), PEAK_FLOPS)
        results[path]["wall_s"] = time.perf_counter() - start

    record = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "gpu": gpu_name(), "arch": args.arch, "shape": args.shape,
        "model_params": next(iter(results.values()))["n_params"] if results else None, "world_size": 1,
        "pairs": args.pairs, "max_length": args.max_length, "warmup_steps": args.warmup_steps, "steps": args.steps,
        "pairs_per_step": 32, "peak_flops": PEAK_FLOPS, "versions": versions(), "command": command,
        **{path: r for path, r in results.items()}, "errors": errors,
    }  # fmt: skip
    ok = not errors
    for path in FAST_PATHS:
        if path not in results:
            continue
        suffix = record_suffix(path)
        record[f"ref_pass_s{suffix}"] = results[path]["ref_pass_s"]
        if "stock" in results:
            stock_rate = results["stock"]["real_tokens_per_s"]
            record[f"speedup{suffix}"] = results[path]["real_tokens_per_s"] / stock_rate
            record[f"speedup_train_only{suffix}"] = results[path]["train_tokens_per_s"] / stock_rate
            record[f"same_first_batch{suffix}"] = check = compare(results["stock"], results[path])
            check["loss_ok"] = bool(check["loss_fixed_ref"]["abs_diff"] <= args.loss_tol
                                    and abs(check["loss_step0"]["stock"] - LN2) <= args.step0_tol
                                    and abs(check["loss_step0"]["fast"] - LN2) <= args.step0_tol)  # fmt: skip
            check["step0_tol"] = args.step0_tol
            ok = ok and check["loss_ok"]
    if "fast" in results and "fast_shared" in results:
        record["shared_over_unshared"] = (
            results["fast_shared"]["real_tokens_per_s"] / results["fast"]["real_tokens_per_s"]
        )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = record["gpu"].replace(" ", "-").replace("/", "-")
    name = f"{time.strftime('%Y%m%d-%H%M%S')}_{args.arch}_{gpu}{'_' + args.tag if args.tag else ''}.json"
    (out_dir / name).write_text(json.dumps(record, indent=1) + "\n")
    print(report(record))
    print(f"wrote {out_dir / name}")
    return 0 if ok else 1


def report(record: dict) -> str:
    lines = [f"{record['arch']} ({record['model_params'] / 1e9:.2f}B) on {record['gpu']}, {record['pairs']} "
             f"{record.get('shape', 'think')}-shaped pairs, {record['warmup_steps']} warm-up + {record['steps']} timed "
             "steps of 32 pairs"]  # fmt: skip
    lines.append("| path | samples/s | real tok/s | MFU (8N) | +attn | peak GiB | step s median (min-max, cv) |")
    lines.append("|---|---|---|---|---|---|---|")
    for path in ("stock", *FAST_PATHS):
        if path not in record:
            continue
        r = record[path]
        sp = r["step_time_spread"]
        lines.append(
            f"| {path} | {r['samples_per_s']:.2f} | {r['real_tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{100 * r['mfu_with_attention']:.1f}% | {r['peak_mem_gib']:.1f} | {sp['median']:.2f} "
            f"({sp['min']:.2f}-{sp['max']:.2f}, {sp['cv']:.2f}) |"
        )
    for path in FAST_PATHS:
        if path not in record:
            continue
        f = record[path]
        lines.append(f"{path}: train only {f['train_tokens_per_s']:,.0f} tok/s, reference pass {f['ref_pass_s']:.1f} s "
                     f"({f['ref_pass_tokens_per_s']:,.0f} tok/s), {f['attn_implementation']}, "
                     f"{f['micro_batches_per_step']} micro-batches/step")  # fmt: skip
        suffix = record_suffix(path)
        if f"speedup{suffix}" not in record:
            continue
        c = record[f"same_first_batch{suffix}"]
        lines.append(f"speedup ({path}/stock real tok/s, reference pass counted): {record[f'speedup{suffix}']:.2f}x "
                     f"(train only {record[f'speedup_train_only{suffix}']:.2f}x)")  # fmt: skip
        lines.append(f"same first batch: loss stock {c['loss_fixed_ref']['stock']:.5f} {path} "
                     f"{c['loss_fixed_ref']['fast']:.5f} (|diff| {c['loss_fixed_ref']['abs_diff']:.1e}); step-0 loss "
                     f"stock {c['loss_step0']['stock']:.5f} {path} {c['loss_step0']['fast']:.5f} (ln 2 = {LN2:.5f}); "
                     f"policy log-probs max rel diff {c['policy_logps_max_rel_diff']:.1e}; "
                     f"{'OK' if c['loss_ok'] else 'MISMATCH'}")  # fmt: skip
    if "shared_over_unshared" in record:
        lines.append(f"shared prompts: {record['shared_over_unshared']:.3f}x the unshared fast path's real tok/s")
    if record["errors"]:
        lines.append(f"FAILED: {record['errors']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
