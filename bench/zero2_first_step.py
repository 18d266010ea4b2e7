"""The fast path under DeepSpeed ZeRO-2 on N processes: the reference pass through `sfm_dpo.ref_cache` (data-parallel
over the ranks), then `FastDPOTrainer` for a few steps at a fixed global batch (`--pairs-per-step`, 32); rank 0 writes the step
losses, gradient norms, times and memory. Run at N = 1 and N = 2 and compare (the first step's loss and
gradient norm agree between 1 GPU and N GPUs at the same global batch).

    accelerate launch --config_file accelerate_config.yaml --num_processes 2 bench/zero2_first_step.py \
        --arch gpt_neox_1.4b --out /tmp/zero2_n2.json
    python bench/zero2_first_step.py --compare /tmp/zero2_n1.json /tmp/zero2_n2.json

The learning rate is 1e-4 with no warm-up (not the recipe's 1e-6 with 10% warm-up) so that step 1 really moves the
fp32 master weights and step 2's loss shows it: at 1e-6 the bf16 weights would not change at all.
"""

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _reference_pass(args, state, model, dataset, cuda):
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from sfm_dpo import ref_cache
    from sfm_dpo.attention import apply_backend, select_backend
    from sfm_dpo.fast_path import REF_BUDGET_FACTOR
    from sfm_dpo.kernels import compile_decoder_layers
    from sfm_dpo.packing import reference_logps_fn

    backend = select_backend("auto", state.device, torch.bfloat16 if cuda else torch.float32)
    apply_backend(model, backend)
    add_fused_lm_head(model)
    if args.compile_layers:  # as sfm_dpo.fast_path
        compile_decoder_layers(model)

    # Reference pass before the trainer: under ZeRO-2 the model is whole on each rank, already on its GPU, in the
    # bf16 the DeepSpeed engine will run. No autocast: accelerate does not autocast under DeepSpeed (native_amp is
    # off, the engine runs the bf16 module as is), and the reference must see the training forward's numerics. (The
    # step-1 losses of 0.6972 / 0.7186 instead of ln 2 in the first GPU runs came from the Trainer's cast of the
    # cached values to bf16, fixed in FastDPOTrainer._prepare_input.)
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and not deepspeed else None
    ref_budget = args.ref_token_budget or REF_BUDGET_FACTOR * args.token_budget
    compute_fn = reference_logps_fn(model, state.device, max_tokens=ref_budget, context=autocast)
    if args.compile_layers:  # compile the no-grad graph outside the timed pass (once per run)
        compute_fn([{k: dataset[0][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="ref_cache_")
    dataset = ref_cache.load_or_compute(dataset, compute_fn, cache, {"bench": args.arch, "seed": args.seed}, state,
                                        token_budget=ref_budget)  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    ref_pass_s = time.perf_counter() - start
    if cuda:
        torch.cuda.empty_cache()  # as sfm_dpo.fast_path
    ref_tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"],
                                                                      dataset["rejected_ids"]))  # fmt: skip
    return backend, ref_pass_s, ref_tokens, ref_budget, dataset


def run(args) -> None:
    import torch
    from accelerate import PartialState
    from synthetic import ARCHS, build_model, synthetic_dataset
    from trl import DPOConfig, DPOTrainer

    from sfm_dpo.fast_trainer import FastDPOTrainer
    from sfm_dpo.tiny import build_tiny_tokenizer

    cuda = torch.cuda.is_available()
    state = PartialState(cpu=not cuda)
    dataset = synthetic_dataset(args.pairs, ARCHS[args.arch]["vocab_size"], args.max_length, seed=args.seed)
    model = build_model(args.arch, state.device, seed=args.seed)
    if args.stock:  # TRL as shipped: padded batches, sdpa, a reference model kept (a bf16 replica on every GPU)
        backend, ref_pass_s, ref_tokens, ref_budget = "sdpa (stock)", None, None, None
        ref_model = copy.deepcopy(model).eval()
    else:
        ref_model = None
        backend, ref_pass_s, ref_tokens, ref_budget, dataset = _reference_pass(args, state, model, dataset, cuda)

    # The seed configuration's 4 pairs per micro-batch; the fast path replaces the accumulation by its token plan.
    accumulation = max(1, args.pairs_per_step // (4 * state.num_processes))
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="zero2_"), per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation, max_length=args.max_length, loss_type=["sigmoid_norm"], beta=5.0,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps,
        bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=args.grad_ckpt or args.stock,
        padding_free=not args.stock, precompute_ref_log_probs=not args.stock, logging_steps=1, save_strategy="no",
        report_to=[], seed=42, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    times, local_tokens, counter = [], [], {"tokens": 0}

    class Timer:
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda *a, **k: None
            raise AttributeError(name)

        def on_train_begin(self, *a, **k):
            torch.cuda.synchronize() if cuda else None
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize() if cuda else None
            now = time.perf_counter()
            times.append(now - self.last)
            local_tokens.append(int(counter["tokens"]))  # this rank's real tokens in the step (device sum, read here)
            counter["tokens"] = 0
            self.last = now

    class CountingFast(FastDPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            if model.training:
                counter["tokens"] += (inputs["pair_weights"][inputs["sequence_index"] // 2] > 0).sum()
            return super()._compute_loss(model, inputs, return_outputs)

    class CountingStock(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):  # already tokenized
            return dataset

        def _compute_loss(self, model, inputs, return_outputs):
            if model.training:
                counter["tokens"] += inputs["attention_mask"].sum()
            return super()._compute_loss(model, inputs, return_outputs)

    common = dict(model=model, args=config, train_dataset=dataset, processing_class=build_tiny_tokenizer(),
                  callbacks=[Timer()])  # fmt: skip
    if args.stock:
        trainer = CountingStock(ref_model=ref_model, **common)
    else:
        trainer = CountingFast(attn_backend=backend, max_tokens_per_microbatch=args.token_budget,
                               pairs_per_step=args.pairs_per_step, **common)  # fmt: skip
    torch.cuda.reset_peak_memory_stats() if cuda else None
    try:
        trainer.train()
    except torch.OutOfMemoryError as e:  # say by how much a shape misses, with the peak so far
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(json.dumps({"rank": state.process_index, "world_size": state.num_processes, "arch": args.arch,
                          "max_length": args.max_length, "oom": str(e).splitlines()[0][:400],
                          "peak_before_oom_gib": peak, "ref_pass_s": ref_pass_s}), flush=True)  # fmt: skip
        raise
    engine = trainer.model_wrapped
    stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
    if cuda and (type(engine).__name__ != "DeepSpeedEngine" or stage != 2):
        raise RuntimeError(f"Expected a DeepSpeed ZeRO-2 engine, got {type(engine).__name__} stage {stage}.")
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=state.device)
    peaks = trainer.accelerator.gather(peak[None]).tolist()
    logs = [h for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    step_tokens = trainer.accelerator.reduce(torch.tensor(local_tokens, device=state.device), "sum").tolist()
    timed = slice(args.warmup_steps, None)
    seconds = sum(times[timed])
    if state.is_main_process:
        import torch as _torch
        import transformers
        import trl

        record = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "gpu": _torch.cuda.get_device_name(0) if cuda else "CPU", "arch": args.arch,
            "model_params": sum(p.numel() for p in model.parameters()), "world_size": state.num_processes,
            "engine": f"{type(engine).__name__} ZeRO-{stage}", "attn_backend": backend,
            "pairs_per_step": args.pairs_per_step,
            "compile_layers": args.compile_layers, "gradient_checkpointing": args.grad_ckpt,
            "max_length": args.max_length, "token_budget": args.token_budget, "ref_token_budget": ref_budget,
            "ref_pass_tokens": ref_tokens,
            "learning_rate": args.learning_rate, "losses": [h["loss"] for h in logs],
            "path": "stock" if args.stock else "fast",
            "microbatches_per_step": accumulation if args.stock else trainer.batch_sampler.microbatches_per_step,
            # transformers without this attribute (5.17 on the GPU machine) divides the loss by the accumulation
            # steps again: logged loss and gradient norm are then 1/microbatches_per_step of the true ones.
            "trainer_honors_loss_is_scaled_for_ga": hasattr(type(trainer), "loss_is_scaled_for_ga"),
            "grad_norms": [h["grad_norm"] for h in logs], "step_times_s": times, "step_tokens": step_tokens,
            "ref_pass_s": ref_pass_s, "peak_mem_gib_per_rank": peaks,
            "samples_per_s": args.pairs_per_step * len(times[timed]) / seconds if seconds else None,
            "train_tokens_per_s": sum(step_tokens[timed]) / seconds if seconds else None,
            "train_tokens_per_s_per_gpu": sum(step_tokens[timed]) / seconds / state.num_processes if seconds else None,
            "versions": {"torch": _torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "command": " ".join(sys.argv),
        }  # fmt: skip
        record.update(derived_rates(record, args.stock))
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps({k: record.get(k) for k in ("world_size", "arch", "path", "max_length", "losses", "grad_norms",
                                                     "ref_pass_s", "train_tokens_per_s_per_gpu",
                                                     "combined_tokens_per_s_per_gpu", "mfu", "peak_mem_gib_per_rank",
                                                     "zero2_static_gib_per_gpu")}))  # fmt: skip


def derived_rates(record: dict, stock: bool, peak_flops: float = 989e12) -> dict:
    """MFU as in ../shared/DEVICE.md (6N per policy token + 2N per reference token), the reference pass amortized
    (fast path: combined = 1 / (train s/token + pass s/token)), and the ZeRO-2 partition arithmetic per GPU:
    bf16 weights 2N on every GPU, bf16 gradients 2N/W and fp32 master weights + Adam moments 12N/W."""
    n, w = record["model_params"], record["world_size"]
    per_gpu = record["train_tokens_per_s_per_gpu"]
    out = {"zero2_static_gib_per_gpu": (2 * n + 14 * n / w) / 2**30}
    if per_gpu is None:
        return out
    if stock:  # the reference forward runs inside each step
        out.update(mfu=8 * n * per_gpu / peak_flops, combined_tokens_per_s_per_gpu=per_gpu)
        return out
    ref_per_gpu = record["ref_pass_tokens"] / record["ref_pass_s"] / w
    combined = 1 / (1 / per_gpu + 1 / ref_per_gpu)
    out.update(train_mfu_6n=6 * n * per_gpu / peak_flops, ref_pass_tokens_per_s_per_gpu=ref_per_gpu,
               combined_tokens_per_s_per_gpu=combined, mfu=8 * n * combined / peak_flops)  # fmt: skip
    return out


def compare(paths, out=None, ga_override=None) -> int:
    """Step losses and gradient norms of the runs agree (bf16 tolerance: 2% on the norm, 1e-3 on the loss)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for run, ga in zip(runs, ga_override or [None] * len(runs)):
        ga = ga or run.get("microbatches_per_step")
        if not run.get("trainer_honors_loss_is_scaled_for_ga", False):
            if ga is None:
                raise ValueError(f"{run['command']}: loss divided by an unknown accumulation count; pass --ga.")
            run["ga_correction"] = ga  # undo the Trainer's extra division by the accumulation steps
            run["losses"] = [x * ga for x in run["losses"]]
            run["grad_norms"] = [x * ga for x in run["grad_norms"]]
    base = runs[0]
    ok = True
    for other in runs[1:]:
        for step, (l0, l1, g0, g1) in enumerate(zip(base["losses"], other["losses"], base["grad_norms"],
                                                    other["grad_norms"]), 1):  # fmt: skip
            good = abs(l0 - l1) <= 1e-3 and abs(g0 - g1) <= 0.02 * g0
            ok &= good
            print(f"step {step}: loss {l0:.6f} (N={base['world_size']}) vs {l1:.6f} (N={other['world_size']}), "
                  f"grad norm {g0:.5f} vs {g1:.5f} {'OK' if good else 'MISMATCH'}")  # fmt: skip
    if math.isclose(base["losses"][0], math.log(2), abs_tol=1e-3):
        print("step 1 loss is ln 2: the cached reference equals the policy at step 0")
    if out:
        Path(out).write_text(json.dumps({"runs": runs, "agree": ok}, indent=1) + "\n")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt_neox_1.4b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=None, help="default 32 x steps")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--compile-layers", action="store_true")
    parser.add_argument("--ref-token-budget", type=int, default=None, help="default 4 x --token-budget")
    parser.add_argument("--pairs-per-step", type=int, default=32)
    parser.add_argument("--stock", action="store_true", help="stock TRL (seed configuration) instead of the fast path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="zero2_first_step.json")
    parser.add_argument("--compare", nargs="+", help="compare these result files instead of running")
    parser.add_argument("--compare-out", default=None)
    parser.add_argument("--ga", type=int, nargs="+", help="micro-batches per step of each compared run, if not stored")
    args = parser.parse_args()
    if args.compare:
        return compare(args.compare, args.compare_out, args.ga)
    args.pairs = args.pairs or args.pairs_per_step * args.steps
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
