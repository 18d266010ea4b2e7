"""Every recipe parses through the real TrlParser and resolves to OLMo 3's DPO recipe (litgpt test_config_hub)."""

import logging
import math

import pytest

from sfm_dpo.config import ScriptArguments, check_recipe, derive_run_names, gradient_accumulation_for, make_parser
from tests.conftest import REPO

RECIPES = {"think": (8192, 4096), "instruct": (4096, 2048)}


def parse(recipe: str, *overrides: str):
    # use_cpu: bf16 recipes are refused by TrainingArguments on a machine without a GPU.
    return make_parser().parse_args_and_config(
        ["--config", str(REPO / "configs" / f"{recipe}.yaml"), "--use_cpu", "true", *overrides]
    )


@pytest.mark.parametrize("recipe", ["think", "instruct", "demo"])
def test_every_recipe_parses(recipe):
    script_args, training_args, model_args = parse(recipe)
    check_recipe(script_args, training_args, model_args)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_is_olmo3_dpo(recipe):
    script_args, args, model_args = parse(recipe)
    max_length, max_prompt_length = RECIPES[recipe]
    assert args.beta == 5.0
    assert args.learning_rate == 1e-6
    assert (
        str(args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value") else args.lr_scheduler_type)
        == "linear"
    )
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(1000) == 100
    assert args.num_train_epochs == 1
    assert args.weight_decay == 0.0
    assert args.bf16 is True
    assert args.gradient_checkpointing is True
    assert args.per_device_train_batch_size == 4
    assert args.max_length == max_length
    assert script_args.max_prompt_length == max_prompt_length
    assert args.loss_type == ["sigmoid_norm"]
    assert script_args.effective_batch_size == 128
    assert model_args.dtype == "bfloat16"
    # Shared prompts where they measured faster (bench/README.md): Instruct-shaped pairs, not Think's.
    assert script_args.share_prompt is (recipe == "instruct")


def test_recipes_differ_only_in_the_variant():
    think = (REPO / "configs" / "think.yaml").read_text().splitlines()
    instruct = (REPO / "configs" / "instruct.yaml").read_text().splitlines()
    settings = lambda lines: dict(line.split(":", 1) for line in lines if line and not line.startswith("#"))  # noqa: E731
    differing = {k for k in settings(think) if settings(think)[k] != settings(instruct).get(k)}
    assert differing == {
        "model_name_or_path", "dataset_name", "max_prompt_length", "max_length", "output_dir", "hub_model_id",
        "share_prompt",
    }  # fmt: skip


@pytest.mark.parametrize(("world_size", "accumulation"), [(1, 32), (4, 8), (8, 4), (32, 1)])
def test_effective_batch_is_128_pairs_at_any_world_size(world_size, accumulation):
    assert gradient_accumulation_for(128, 4, world_size) == accumulation
    assert 4 * world_size * accumulation == 128


@pytest.mark.parametrize(("per_device", "world_size"), [(4, 3), (4, 64), (3, 4)])
def test_unreachable_effective_batch_is_a_clear_error(per_device, world_size):
    with pytest.raises(ValueError, match=rf"effective batch of 128 pairs is not reachable.*{world_size} processes"):
        gradient_accumulation_for(128, per_device, world_size)


@pytest.mark.parametrize("typo", ["--learning_rat", "--no_such_field"])
def test_unknown_override_fails(typo):
    with pytest.raises(ValueError, match=f"not used by the HfArgumentParser: \\['{typo}'"):
        parse("think", typo, "1e-7")


def test_command_line_overrides_recipe():
    _, args, _ = parse("think", "--learning_rate", "5e-7", "--beta", "0.1")
    assert args.learning_rate == 5e-7 and args.beta == 0.1


def test_bad_settings_fail_before_any_work():
    script_args, args, model_args = parse("think", "--max_prompt_length", "8192")
    with pytest.raises(ValueError, match="max_prompt_length"):
        check_recipe(script_args, args, model_args)
    # TRL's field, which nothing here reads: the held-out pairs come from --eval_split_ratio.
    script_args, args, model_args = parse("think", "--dataset_test_split", "validation")
    with pytest.raises(ValueError, match="--dataset_test_split validation is not read.*--eval_split_ratio"):
        check_recipe(script_args, args, model_args)
    with pytest.raises(SystemExit):  # argparse refuses a value outside `choices`
        parse("think", "--overlong_policy", "shrink")
    with pytest.raises(ValueError, match="overlong_policy"):
        ScriptArguments(dataset_name="x.jsonl", overlong_policy="shrink")
    with pytest.raises(ValueError, match="dataset_name is required"):
        ScriptArguments()
    for name in ("max_tokens_per_microbatch", "ref_tokens_per_batch"):
        with pytest.raises(ValueError, match=f"--{name} must be positive, got 0"):
            ScriptArguments(dataset_name="x.jsonl", **{name: 0})


def test_model_override_gives_per_model_output_and_hub_id():
    log = logging.getLogger("test")
    argv = ["--config", "configs/think.yaml", "--model_name_or_path", "geodesic-research/sfm-other"]
    _, args, model_args = parse("think", *argv[2:])
    derive_run_names(args, argv, log)
    assert args.output_dir == "outputs/dpo/sfm-other"
    assert args.hub_model_id == "geodesic-research/sfm-other-DPO"
    # Explicit values win.
    argv += ["--output_dir", "x", "--hub_model_id", "me/y"]
    _, args, model_args = parse("think", *argv[2:])
    derive_run_names(args, argv, log)
    assert (args.output_dir, args.hub_model_id) == ("x", "me/y")
    # No override: the recipe stands.
    _, args, model_args = parse("think")
    derive_run_names(args, ["--config", "configs/think.yaml"], log)
    assert (args.output_dir, args.hub_model_id) == (
        "outputs/dpo",
        "geodesic-research/sfm-sft_dolci_think_unfiltered-DPO",
    )


def test_a_token_in_the_recipe_is_refused():
    script_args, args, model_args = parse("think", "--hub_token", "hf_" + "x" * 34)
    with pytest.raises(ValueError, match="put HF_TOKEN=... in .env") as refused:
        check_recipe(script_args, args, model_args)
    assert "hf_x" not in str(refused.value)


def test_warmup_is_ten_percent():
    _, args, _ = parse("think")
    assert args.get_warmup_steps(1171) == math.ceil(117.1)
