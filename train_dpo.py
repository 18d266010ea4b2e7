"""DPO post-training of an SFM model with TRL's DPOTrainer (OLMo 3's recipe), under accelerate + DeepSpeed ZeRO-2.

    accelerate launch --config_file accelerate_config.yaml train_dpo.py --config configs/think.yaml
    bash scripts/launch.sh demo          # the embedded default: tiny local model and data, on the CPU

Any recipe field can be overridden on the command line (`--learning_rate 5e-7`). Order: seed, logging, config dump,
model, data, trainer, train, save, push.
"""

import logging
import sys

from sfm_dpo.versions import require_supported

require_supported()  # before the heavy imports: an unsupported Python or package is one line with the fix
import datasets
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, ModelConfig

from sfm_dpo.chat_templates import resolve_chat_template
from sfm_dpo.checkpoints import finished_training, latest_complete_checkpoint
from sfm_dpo.compat import quiet_known_noise, renamed_args
from sfm_dpo.config import ScriptArguments, check_recipe, derive_run_names, gradient_accumulation_for, make_parser
from sfm_dpo.credentials import check_hub_access, configure_wandb, load_secrets, push_final_model
from sfm_dpo.data import prepare_dataset, split_for_eval
from sfm_dpo.fast_path import build_trainer
from sfm_dpo.preemption import PreemptionCallback
from sfm_dpo.preflight import check_disk_space, dump_config, resolved_config, save_config
from sfm_dpo.reporting import run_summary, save_summary, summary_text
from sfm_dpo.run_report import write_report_or_log

logger = logging.getLogger(__name__)

PUSH_FAILED_EXIT_CODE = 2


def setup_logging(training_args: DPOConfig) -> None:
    level = training_args.get_process_log_level()  # only rank 0 talks
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    for name in ("__main__", "sfm_dpo"):
        logging.getLogger(name).setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def recipe_model(argv: list[str]) -> str | None:
    if "--config" not in argv:
        return None
    with open(argv[argv.index("--config") + 1]) as f:
        return (yaml.safe_load(f) or {}).get("model_name_or_path")


def main(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelConfig) -> int:
    set_seed(training_args.seed)
    setup_logging(training_args)
    argv = sys.argv[1:]

    # Everything that can be wrong with the request fails here, before the model or the data is loaded.
    check_recipe(script_args, training_args, model_args)
    derive_run_names(model_args, training_args, recipe_model(argv), argv, logger)
    world_size = training_args.world_size
    training_args.gradient_accumulation_steps = gradient_accumulation_for(
        script_args.effective_batch_size, training_args.per_device_train_batch_size, world_size
    )
    logger.info(
        "Effective batch: %d pairs = %d per device x %d processes x %d accumulation steps.",
        script_args.effective_batch_size, training_args.per_device_train_batch_size, world_size,
        training_args.gradient_accumulation_steps,
    )  # fmt: skip
    configure_wandb(training_args.report_to)
    push_to_hub = training_args.push_to_hub
    if push_to_hub:
        check_hub_access(training_args.hub_model_id)
        # We push the final model ourselves (see push_final_model); the Trainer would create the repo now and upload
        # every checkpoint.
        training_args.push_to_hub = False
    config = resolved_config(script_args, training_args, model_args, world_size)
    logger.info("Resolved configuration:\n%s", dump_config(config))
    if training_args.process_index == 0:
        logger.info("Saved the resolved configuration to %s", save_config(config, training_args.output_dir))

    # A finished run (a requeue after the last step, a resubmitted job) has nothing to train: resuming its last
    # checkpoint would run one step past the end and overwrite the final model.
    last_checkpoint = latest_complete_checkpoint(training_args.output_dir)
    finished = [
        d for d in (training_args.output_dir, last_checkpoint)
        if d and finished_training(d, training_args.max_steps, training_args.num_train_epochs)
    ]  # fmt: skip
    if finished:
        logger.warning(
            "%s is at the last step of this training: nothing to train. The final model is in %s (or, if its save "
            "was interrupted, in the newest checkpoint). To train again, pass another --output_dir.",
            finished[0], training_args.output_dir,
        )  # fmt: skip
        return 0

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    resolve_chat_template(tokenizer, script_args.chat_template, logger)
    if tokenizer.pad_token is None:
        # Safe even when pad == eos: masks come from sequence lengths, never from the pad id.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using eos %r for padding.", tokenizer.eos_token)
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Model %s: %.3fB parameters, %s, attention %s.",
        model_args.model_name_or_path,
        n_params / 1e9,
        model.dtype,
        model.config._attn_implementation,
    )
    if training_args.process_index == 0:
        check_disk_space(
            training_args.output_dir, n_params, training_args.save_total_limit, training_args.save_only_model
        )

    with training_args.main_process_first(desc="preparing the preference data"):
        train_dataset, data_report = prepare_dataset(script_args, training_args, tokenizer)
        # Rank 0 first: it records the held-out split, which the other ranks (and any resumed run) then read back.
        train_dataset, eval_dataset, eval_split = split_for_eval(train_dataset, script_args, training_args, data_report)
        if eval_split is not None and training_args.process_index == 0:
            eval_split.save(training_args.output_dir)
    data_report.log(logger)
    if training_args.process_index == 0:
        data_report.save(f"{training_args.output_dir}/data_report.json")

    preemption = PreemptionCallback()  # SIGUSR1 (Slurm's pre-timeout signal): checkpoint at the next step, stop
    trainer = build_trainer(
        model, train_dataset, script_args, training_args, model_args, tokenizer, [preemption], eval_dataset=eval_dataset
    )
    # A requeued or resubmitted job resumes from its newest COMPLETE checkpoint: optimizer, scheduler, RNG and data
    # position included (the Trainer restores them and skips the batches already seen).
    if last_checkpoint:
        logger.info("Resuming from %s", last_checkpoint)
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    if preemption.preempted:
        logger.warning(
            "Stopped for preemption at step %d; the checkpoint is saved and the job resumes from it.",
            trainer.state.global_step,
        )
        return 0

    trainer.save_model(training_args.output_dir)
    summary = run_summary(trainer, train_result, training_args.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        trainer.save_state()
        save_summary(summary, training_args.output_dir)
        write_report_or_log(training_args.output_dir, logger)
    logger.info(summary_text(summary))

    if push_to_hub:
        try:
            if trainer.is_world_process_zero():
                trainer.create_model_card(
                    model_name=training_args.hub_model_id.split("/")[-1], dataset_name=script_args.dataset_name
                )
                push_final_model(training_args.output_dir, training_args.hub_model_id, training_args.hub_private_repo)
        except Exception as e:  # noqa: BLE001 - the local save above stands; the exit code says the push failed
            logger.error(
                "Push to %s failed (%s: %s). The model is saved in %s.",
                training_args.hub_model_id,
                type(e).__name__,
                e,
                training_args.output_dir,
            )
            return PUSH_FAILED_EXIT_CODE
        logger.info("Pushed to https://huggingface.co/%s", training_args.hub_model_id)
    return 0


if __name__ == "__main__":
    load_secrets()  # before parsing, so .env can set WANDB_PROJECT and friends
    quiet_known_noise()  # DeepSpeed's and accelerate's known notices: dropped, noted once (sfm_dpo/compat.py)
    sys.argv[1:] = renamed_args(sys.argv[1:])  # transformers' deprecated argument names -> the new ones, logged
    sys.exit(main(*make_parser().parse_args_and_config()))
