"""The trainer's DPO loss and metrics against an independent computation from the raw logits (torchtune
test_dpo_loss): DPO (Rafailov et al. 2023, eq. 7) and its length-normalized form (OLMo 3 / open-instruct `dpo_norm`,
TRL `sigmoid_norm`)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from trl import DPOConfig

from sfm_dpo.data import prepare_dataset
from sfm_dpo.trainer import SFMDPOTrainer

BETA = 5.0


@pytest.fixture(scope="module")
def olmo3_assets(tmp_path_factory, demo_assets):
    """A tiny OLMo-3-layout model (sliding window on 3 of 4 layers) with the OLMo 3 ChatML template."""
    from sfm_dpo.chat_templates import CHATML_TEMPLATE
    from sfm_dpo.tiny import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("olmo3") / "tiny-olmo3"
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    build_tiny_model("olmo3", len(tokenizer), out_dir=folder)
    return {"model": folder, "think": demo_assets["think"], "tokenizer": tokenizer}


def make_trainer(demo_assets, tokenizer, tmp_path, loss_type, perturb: float):
    policy = AutoModelForCausalLM.from_pretrained(demo_assets["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(demo_assets["model"], dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(perturb * torch.randn_like(p))
    script_args = SimpleNamespace(
        dataset_name=str(demo_assets["think"]), dataset_config=None, dataset_train_split="train", max_train_samples=8,
        skip_invalid_rows=False, keep_degenerate_pairs=False, max_prompt_length=64, overlong_policy="truncate",
    )  # fmt: skip
    args = DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4, max_length=256,
        beta=BETA, loss_type=loss_type, bf16=False,
    )  # fmt: skip
    dataset, _ = prepare_dataset(script_args, args, tokenizer)
    trainer = SFMDPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.model.train()  # metrics go to the "train" bucket; TRL disabled dropout
    batch = trainer.data_collator([dataset[i] for i in range(4)])
    return trainer, policy, reference, batch


def summed_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: full logits, log-softmax, gather the next token, sum over completion tokens."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].double()
    return (logps * mask).sum(1), mask.sum(1)


@pytest.mark.parametrize(
    ("arch", "loss_type"), [("gpt_neox", "sigmoid"), ("gpt_neox", "sigmoid_norm"), ("olmo3", "sigmoid_norm")]
)
def test_loss_matches_hand_computation(demo_assets, olmo3_assets, tiny_tokenizer, tmp_path, arch, loss_type):
    assets, tokenizer = (
        (demo_assets, tiny_tokenizer) if arch == "gpt_neox" else (olmo3_assets, olmo3_assets["tokenizer"])
    )
    trainer, policy, reference, batch = make_trainer(assets, tokenizer, tmp_path, loss_type, perturb=0.05)
    if arch == "olmo3":  # the ChatML prompt really reached the model, and the pairs exceed the window of 8
        assert (
            batch["input_ids"].shape[1] > 8 and tokenizer.convert_tokens_to_ids("<|im_start|>") in batch["input_ids"]
        )
    loss = trainer.compute_loss(trainer.model, batch).item()

    policy_logps, tokens = summed_logps(policy, batch)
    ref_logps, _ = summed_logps(reference, batch)
    ratio = policy_logps - ref_logps
    if loss_type == "sigmoid_norm":
        ratio = ratio / tokens
    chosen, rejected = ratio.chunk(2)
    expected = -F.logsigmoid(BETA * (chosen - rejected)).mean().item()
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert abs(loss - math.log(2)) > 1e-3  # the perturbation really moved the policy

    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    raw_chosen, raw_rejected = (policy_logps - ref_logps).chunk(2)
    assert metrics["rewards/margins"] == pytest.approx((BETA * (raw_chosen - raw_rejected)).mean().item(), rel=1e-4)
    norm_chosen, norm_rejected = ((policy_logps - ref_logps) / tokens).chunk(2)
    assert metrics["rewards_norm/chosen"] == pytest.approx((BETA * norm_chosen).mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["rewards_norm/margins"] == pytest.approx(
        (BETA * (norm_chosen - norm_rejected)).mean().item(), rel=1e-4, abs=1e-6
    )
    assert metrics["rewards_norm/accuracies"] == pytest.approx((norm_chosen > norm_rejected).double().mean().item())


@pytest.mark.parametrize("loss_type", ["sigmoid", "sigmoid_norm"])
def test_first_step_loss_is_ln2_with_zero_margins(demo_assets, tiny_tokenizer, tmp_path, loss_type):
    trainer, _, _, batch = make_trainer(demo_assets, tiny_tokenizer, tmp_path, loss_type, perturb=0.0)
    loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(math.log(2), abs=1e-6)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for key in ("rewards/margins", "rewards/chosen", "rewards_norm/margins", "rewards_norm/chosen"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-6), key
