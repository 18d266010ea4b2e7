"""Where the fast path's time goes, one model, no Trainer: packed training micro-batches (forward + backward) and
reference micro-batches (no-grad forward), per kernel variant, with the top CUDA kernels of each (GPU only).

    python bench/profile_step.py --arch gpt_neox_1.4b --variants eager,compile --ref-budgets 16384,65536

Variants: `eager` (the packed forward as the trainer runs it without kernel work), `compile`
(`sfm_dpo.kernels.compile_decoder_layers`), `liger` (Liger-Kernel's OLMo-3 RoPE/RMSNorm/SwiGLU, when installed),
`liger+compile`. Each variant builds a fresh model (bf16, varlen attention, TRL's fused LM head) and runs under bf16
autocast, as bench_dpo.py's fast path does. Prints real tokens/s, MFU (6N train, 2N reference) and peak memory, and
writes a JSON to --out.
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from synthetic import ARCHS, build_model, synthetic_dataset  # noqa: E402

from sfm_dpo.attention import apply_backend  # noqa: E402
from sfm_dpo.kernels import compile_decoder_layers  # noqa: E402
from sfm_dpo.packing import group_by_tokens, pack_pairs, packed_forward, pair_tokens  # noqa: E402

PEAK_FLOPS = 989e12


def micro_batches(arch: str, budget: int, n_batches: int, max_length: int, seed: int = 0) -> list[dict]:
    """`n_batches` packed micro-batches of at most `budget` tokens (a longer pair alone) on the GPU."""
    n_pairs = 8 + n_batches * budget // 3000  # a pair is ~6,500 tokens on average at max_length 8192
    rows = synthetic_dataset(n_pairs, ARCHS[arch]["vocab_size"], max_length, seed=seed).to_list()
    random.Random(seed).shuffle(rows)
    groups = group_by_tokens([pair_tokens(r) for r in rows], budget)
    return [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in pack_pairs([rows[i] for i in g]).items()}
            for g in groups[:n_batches]]  # fmt: skip


def build(arch: str, variant: str, grad_ckpt: bool, ckpt_layers: int | None = None):
    from trl.trainer.utils import add_fused_lm_head

    model = build_model(arch, "cuda")
    apply_backend(model, "varlen")
    if "liger" in variant:
        from liger_kernel.transformers import apply_liger_kernel_to_olmo3

        apply_liger_kernel_to_olmo3(fused_linear_cross_entropy=False, model=model)
    add_fused_lm_head(model)
    if "compile" in variant:  # compile_ckpt: the checkpoint traced inside the compiled graph
        compile_decoder_layers(model, traced_checkpoint="ckpt" in variant)
    if grad_ckpt:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        if ckpt_layers is not None:  # selective recompute: only the first `ckpt_layers` decoder layers
            for index, layer in enumerate(model.get_decoder().layers):
                layer.gradient_checkpointing = index < ckpt_layers
    return model


def step(model, batch, train: bool) -> None:
    """One micro-batch: the packed forward under bf16 autocast, and its backward when training."""
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        logps, _ = packed_forward(model, batch)
    if train:
        logps.sum().backward()
        model.zero_grad(set_to_none=True)


def run(model, batches, train: bool, warmup: int) -> tuple[float, int, list[float]]:
    """Seconds, real tokens and per-batch seconds of `batches[warmup:]`."""
    model.train(train)
    seconds, tokens, per_batch = 0.0, 0, []
    for i, batch in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, batch, train)
        torch.cuda.synchronize()
        if i >= warmup:
            per_batch.append(time.perf_counter() - start)
            seconds += per_batch[-1]
            tokens += batch["input_ids"].shape[1]
    return seconds, tokens, per_batch


def kernel_table(model, batches, train: bool, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    model.train(train)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            step(model, batch, train)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt_neox_1.4b")
    parser.add_argument("--variants", default="eager,compile")
    parser.add_argument("--budget", type=int, default=16384, help="training micro-batch tokens")
    parser.add_argument("--ref-budgets", default="16384", help="comma list: reference micro-batch tokens")
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument(
        "--ckpt-layers",
        default=None,
        help="comma list: with --grad-ckpt, recompute only the first K layers (one run each)",
    )
    parser.add_argument("--batches", type=int, default=10, help="timed micro-batches per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--profile-rows", type=int, default=18)
    parser.add_argument("--repeat", action="store_true", help="time the training batches again (seen shapes)")
    parser.add_argument("--no-kernel-table", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    n = args.warmup + args.batches
    ref_budgets = [int(b) for b in args.ref_budgets.split(",")]
    train_batches = micro_batches(args.arch, args.budget, n, args.max_length)
    ckpt_choices = [int(k) for k in args.ckpt_layers.split(",")] if args.ckpt_layers else [None]
    for variant, ckpt_layers in ((v, k) for v in args.variants.split(",") for k in ckpt_choices):
        model = build(args.arch, variant, args.grad_ckpt, ckpt_layers)
        n_params = sum(p.numel() for p in model.parameters())
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            seconds, tokens, per_batch = run(model, train_batches, True, args.warmup)
        except torch.OutOfMemoryError as error:
            record = {"variant": variant, "ckpt_layers": ckpt_layers, "oom": str(error).split(".")[0],
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
            print(json.dumps(record), flush=True)
            results.append(record)
            del model
            torch.cuda.empty_cache()
            continue
        record = {"variant": variant, "arch": args.arch, "n_params": n_params, "grad_ckpt": args.grad_ckpt,
                  "ckpt_layers": ckpt_layers,
                  "train_budget": args.budget, "train_tokens_per_s": tokens / seconds,
                  "train_mfu": 6 * n_params * tokens / seconds / PEAK_FLOPS,
                  "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                  "train_first_batches_s": time.perf_counter() - start - seconds,
                  "train_batch_s": per_batch, "train_batch_tokens": [b["input_ids"].shape[1] for b in
                                                                     train_batches[args.warmup:]]}  # fmt: skip
        if args.repeat:  # the same batches again: shapes already seen
            seconds, tokens, per_batch = run(model, train_batches[args.warmup :], True, 0)
            record["train_tokens_per_s_seen_shapes"] = tokens / seconds
            record["train_batch_s_seen_shapes"] = per_batch
        for budget in ref_budgets:
            n_ref = args.warmup + max(3, args.batches * args.budget // budget)
            ref_batches = micro_batches(args.arch, budget, n_ref, args.max_length, seed=1)
            torch.cuda.reset_peak_memory_stats()
            seconds, tokens, _ = run(model, ref_batches, False, args.warmup)
            record[f"ref_tokens_per_s@{budget}"] = tokens / seconds
            record[f"ref_mfu@{budget}"] = 2 * n_params * tokens / seconds / PEAK_FLOPS
            record[f"ref_peak_gib@{budget}"] = torch.cuda.max_memory_allocated() / 2**30
        best_ref = max(record[f"ref_tokens_per_s@{b}"] for b in ref_budgets)
        record["both_tokens_per_s"] = 1 / (1 / record["train_tokens_per_s"] + 1 / best_ref)
        print(json.dumps(record), flush=True)
        if args.no_kernel_table:
            results.append(record)
            del model
            torch.cuda.empty_cache()
            continue
        print(f"--- {variant}: training micro-batches (forward + backward), top CUDA kernels")
        print(kernel_table(model, train_batches[-2:], True, args.profile_rows), flush=True)
        print(f"--- {variant}: reference micro-batches (no-grad forward), top CUDA kernels")
        print(kernel_table(model, ref_batches[-2:], False, args.profile_rows // 2), flush=True)
        results.append(record)
        del model
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "command": " ".join(sys.argv), "results": results}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
