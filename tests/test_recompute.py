"""Selective recompute (sfm_dpo/recompute.py): the plan's arithmetic by hand, and the plan really applied: recomputed
layers run their forward twice per step, the others once, and the gradients equal full recompute's."""

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from sfm_dpo.recompute import GIB, RecomputePlanCallback, apply_recompute, layer_activation_bytes, plan_recompute

SFM_7B = GPTNeoXConfig(
    hidden_size=4096, num_hidden_layers=32, intermediate_size=16384, num_attention_heads=32, vocab_size=50304
)
SFM_7B_PARAMS = 6_856_253_440


def test_activation_bytes_match_the_h200_measurement():
    # bench/results/20261201-profile_ckpt_gpt_neox_6.9b_h200.json: 0 vs 32 recomputed layers, 16,384-token
    # micro-batches, compiled: peak 113.18 vs 27.26 GiB, i.e. 2.685 GiB per layer.
    measured = (113.18 - 27.26) / 32 * GIB / 16384
    assert layer_activation_bytes(SFM_7B, compiled=True) == pytest.approx(measured, rel=0.01)
    assert layer_activation_bytes(SFM_7B, compiled=False) > layer_activation_bytes(SFM_7B, compiled=True)


@pytest.mark.parametrize(
    ("gpu_gib", "world", "expected"),
    [
        (178.4, 4, 0),  # B200, 4 GPUs ZeRO-2: everything fits
        (79.2, 4, 23),  # H100 80 GB, 4 GPUs ZeRO-2
        (79.2, 2, 32),  # H100, 2 GPUs: the optimizer step's transient alone fills it: all layers, the safe choice
    ],
)
def test_plan_by_hand(gpu_gib, world, expected):
    plan = plan_recompute(SFM_7B, SFM_7B_PARAMS, 16384, int(gpu_gib * GIB), world, 2, compiled=True)
    # By hand: state 2 + 14/world bytes per parameter, transient 6/world, usable 90% of the GPU less 4 GiB; a
    # recomputed layer keeps its bf16 input (2 x 4096 bytes per token), the replay holds one layer's activations.
    static = SFM_7B_PARAMS * (2 + 14 / world)
    transient = 6 * SFM_7B_PARAMS / world
    usable = gpu_gib * GIB * 0.9 - 4 * GIB
    per_layer = 2 * (11 * 4096 + 2.6 * 16384) * 16384
    kept = 2 * 4096 * 16384

    def peak(k):
        return static + max((32 - k) * per_layer + k * kept + (per_layer if k else 0), transient)

    fits = [k for k in range(33) if peak(k) <= usable]
    assert plan.recomputed == (fits[0] if fits else 32) == expected
    assert plan.estimate["peak"] == pytest.approx(peak(expected) / GIB)
    assert ("fits" in plan.reason) == bool(fits)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                           vocab_size=64, rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0)  # fmt: skip
    return GPTNeoXForCausalLM(config).float()


def _step(model, recomputed):
    """One forward + backward in training mode; per-layer forward counts and the gradients."""
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    if recomputed is not None:
        apply_recompute(model, recomputed)
    # Count the MLP's forwards: the checkpoint wraps the layer's forward, so a recomputed layer runs its MLP again in
    # the backward.
    calls = [0] * len(model.gpt_neox.layers)
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.gpt_neox.layers)
    ]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    for hook in hooks:
        hook.remove()
    return calls, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_recomputed_layers_replay_and_gradients_are_unchanged():
    full_calls, full_grads = _step(_tiny_model(), None)
    part_calls, part_grads = _step(_tiny_model(), 1)
    none_calls, _ = _step(_tiny_model(), 0)
    assert full_calls == [2, 2, 2]  # every layer recomputed in the backward
    assert part_calls == [2, 1, 1]  # only the first
    assert none_calls == [1, 1, 1]
    for name, grad in full_grads.items():
        torch.testing.assert_close(part_grads[name], grad, rtol=0, atol=0, msg=name)


def test_callback_plans_after_the_trainer_enabled_checkpointing(tmp_path):
    """In a real Trainer run the callback's choice survives the Trainer's own activation_checkpointing_enable."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = _tiny_model()
    rows = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6]] * 4, "labels": [[1, 2, 3, 4, 5, 6]] * 4})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                             activation_checkpointing=True, report_to=[], save_strategy="no")  # fmt: skip
    callback = RecomputePlanCallback("2", tokens_per_microbatch=12)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    assert callback.recomputed == 2
    assert [layer.gradient_checkpointing for layer in model.gpt_neox.layers] == [True, True, False]


def test_out_of_range_request_names_the_layers():
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        from sfm_dpo.recompute import choose_recompute

        choose_recompute("7", _tiny_model(), 12, 1, None, compiled=False)
