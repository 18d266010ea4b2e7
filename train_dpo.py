"""DPO post-training of an SFM model with TRL's DPOTrainer (OLMo 3's recipe), under accelerate + DeepSpeed ZeRO-2.

    accelerate launch --config_file accelerate_config.yaml train_dpo.py --config configs/think.yaml
    bash scripts/launch.sh demo          # the embedded default: tiny local model and data, on the CPU

Any recipe field can be overridden on the command line (`--learning_rate 5e-7`; without `--output_dir`, such a variant
of the recipe gets its own folder, sfm_dpo.config.derive_run_names). Order: seed, logging, checks, the output folder
(this run's, no live job in it: sfm_dpo/run_identity.py), config dump, disk, data, model, trainer, train, save,
summary, push. A launch of a run whose training is done trains nothing and completes what an earlier launch did not
(sfm_dpo/run_status.py); every launch that owns the folder ends by writing run_status.json there.
"""

import functools
import json
import logging
import sys
from pathlib import Path

from sfm_dpo.versions import require_supported

require_supported()  # before the heavy imports: an unsupported Python or package is one line with the fix
import datasets
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, ModelConfig

from sfm_dpo.chat_templates import resolve_chat_template
from sfm_dpo.checkpoints import check_world_size, finished_training, latest_complete_checkpoint
from sfm_dpo.compat import quiet_known_noise, renamed_args
from sfm_dpo.config import ScriptArguments, check_recipe, derive_run_names, gradient_accumulation_for, make_parser
from sfm_dpo.credentials import (
    check_hub_access,
    configure_wandb,
    load_secrets,
    push_final_model,
    redact,
    refuse_token_arguments,
)
from sfm_dpo.data import prepare_dataset, split_for_eval
from sfm_dpo.fast_path import build_trainer, default_ref_cache_dir
from sfm_dpo.preemption import Preempted, PreemptionCallback, requeue_on_preemption
from sfm_dpo.preflight import check_disk_space, count_parameters, dump_config, resolved_config, save_config
from sfm_dpo.ref_cache import DIGEST_FOLDER
from sfm_dpo.reporting import run_summary, save_summary, summary_from_checkpoint, summary_text
from sfm_dpo.run_identity import RunConflict, claim_output_dir, run_identity
from sfm_dpo.run_report import write_report_or_log
from sfm_dpo.run_status import RunStatus, final_model_from_checkpoint, write_model_card_if_missing

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


def take_output_dir(script_args, training_args, model_args):
    """Rank 0 claims the output folder before anything is written there (sfm_dpo/run_identity.py): refused when it
    holds another run or a live job holds it. Every rank learns the verdict, so that all stop together. Returns the
    lock (rank 0) to hold until exit."""
    lock, refusal = None, None
    if training_args.process_index == 0:
        try:
            # The file digests are stored where the reference pass looks for them: the weights are read once for both.
            digest_dir = default_ref_cache_dir(script_args, training_args) / DIGEST_FOLDER
            identity = run_identity(script_args, training_args, model_args, digest_dir)
            lock = claim_output_dir(training_args.output_dir, identity)
        except RunConflict as e:
            refusal = str(e)
    [refusal] = broadcast_object_list([refusal])
    if refusal is not None:
        if training_args.process_index == 0:
            raise RunConflict(refusal)
        raise SystemExit(1)
    return lock


def destroys_process_group(main):
    """Decorates `main`: once it returns (every rank returns; a requeue for preemption returns 0 too), the process
    group is destroyed, as torch asks. Left up, gloo's worker threads abort the interpreter's exit about one time in
    three ("terminate called without an active exception", SIGABRT), which turns a clean end into train_dpo.py FAILED;
    NCCL warns. Not on an exception: the ranks still running may be inside a collective with this one, and it is the
    torch elastic agent's to end them."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        code = main(*args, **kwargs)
        PartialState().destroy_process_group()
        return code

    return wrapper


@destroys_process_group
@requeue_on_preemption  # a signal before training could checkpoint it: the requeue marker, exit 0
def main(script_args: ScriptArguments, training_args: DPOConfig, model_args: ModelConfig) -> int:
    # First of all: from here on SIGUSR1 (Slurm's pre-timeout signal) is kept, and honoured at the next stage
    # boundary (`preemption.check`) or, once training runs, by a checkpoint at the next step end.
    preemption = PreemptionCallback()
    set_seed(training_args.seed)
    setup_logging(training_args)
    argv = sys.argv[1:]

    # Everything that can be wrong with the request fails here, before the model or the data is loaded.
    check_recipe(script_args, training_args, model_args)
    derive_run_names(training_args, argv, logger)
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

    lock = take_output_dir(script_args, training_args, model_args)
    # From here on the folder is this launch's: rank 0 records how it ends in run_status.json, whatever happens.
    status = RunStatus(training_args.output_dir, write=training_args.process_index == 0)
    try:
        return train_and_finish(script_args, training_args, model_args, config, push_to_hub, preemption, status)
    except Preempted as e:
        status.end("preempted", str(e))
        raise
    except (Exception, KeyboardInterrupt) as e:
        status.end("failed", redact(f"{type(e).__name__}: {e}"))
        raise
    finally:
        if lock is not None:
            lock.release()


def train_and_finish(script_args, training_args, model_args, config, push_to_hub, preemption, status) -> int:
    output_dir = training_args.output_dir
    is_main = training_args.process_index == 0
    if is_main:
        logger.info("Saved the resolved configuration to %s", save_config(config, output_dir))

    # A run whose training is done (a requeue after the last step, a resubmitted job, a failed push) trains nothing:
    # resuming its last checkpoint would run one step past the end and overwrite the final model. What an earlier
    # launch did not get to (the final save, the summary, the push) is done now.
    last_checkpoint = latest_complete_checkpoint(output_dir)
    done = [d for d in (last_checkpoint, output_dir) if d and finished_training(d, training_args.max_steps,
                                                                                 training_args.num_train_epochs)]  # fmt: skip
    if done:
        logger.warning("%s is at the last step of this training: nothing to train.", done[0])
        if not is_main:
            return 0
        return finish_trained_run(
            done[0], last_checkpoint, status, script_args, training_args, model_args, push_to_hub
        )
    if last_checkpoint:  # DeepSpeed would refuse another world size only after the data and the model are loaded
        check_world_size(last_checkpoint, training_args.world_size)

    # Start-up checks that need the model's size (from its config: nothing loaded yet) and the data, before the load.
    n_params = count_parameters(
        model_args.model_name_or_path, model_args.model_revision, training_args.trust_remote_code
    )
    if is_main:
        check_disk_space(output_dir, n_params, training_args.save_total_limit, training_args.save_only_model)
    status.enter("data")
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
    with training_args.main_process_first(desc="preparing the preference data"):
        train_dataset, data_report = prepare_dataset(script_args, training_args, tokenizer)
        # Rank 0 first: it records the held-out split, which the other ranks (and any resumed run) then read back.
        train_dataset, eval_dataset, eval_split = split_for_eval(
            train_dataset, script_args, training_args, data_report
        )
        if eval_split is not None and training_args.process_index == 0:
            eval_split.save(training_args.output_dir)
    data_report.log(logger)
    if training_args.process_index == 0:
        data_report.save(f"{training_args.output_dir}/data_report.json")

    status.enter("model")
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
        trust_remote_code=training_args.trust_remote_code,
    )
    logger.info(
        "Model %s: %.3fB parameters, %s, attention %s.",
        model_args.model_name_or_path,
        n_params / 1e9,
        model.dtype,
        model.config._attn_implementation,
    )

    preemption.check("the model load and the data preparation")
    status.enter("reference")
    trainer = build_trainer(
        model, train_dataset, script_args, training_args, model_args, tokenizer, [preemption], eval_dataset=eval_dataset,
        should_stop=lambda: preemption.requested,
    )  # fmt: skip
    preemption.check("the reference pass")
    status.enter("train")
    # A requeued or resubmitted job resumes from its newest COMPLETE checkpoint: optimizer, scheduler, RNG and data
    # position included (the Trainer restores them and skips the batches already seen).
    if last_checkpoint:
        logger.info("Resuming from %s", last_checkpoint)
    train_result = trainer.train(resume_from_checkpoint=last_checkpoint)
    if preemption.preempted:
        message = f"stopped at step {trainer.state.global_step}; the checkpoint is saved and the job resumes from it"
        logger.warning("Preemption: %s.", message)
        status.end("preempted", message)
        return 0

    step = trainer.state.global_step
    status.enter("save")
    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return 0
    tokenizer.save_pretrained(output_dir)
    trainer.create_model_card(model_name=Path(output_dir).name, dataset_name=script_args.dataset_name)
    trainer.save_state()
    status.record("save", step)
    return close_run(status, step, lambda: run_summary(trainer, train_result, output_dir), training_args, push_to_hub)


def finish_trained_run(trained, last_checkpoint, status, script_args, training_args, model_args, push_to_hub) -> int:
    """Rank 0, for a run whose training ended in an earlier launch: the final save (from the final checkpoint, when
    that launch was preempted at the last step or killed while saving), then `close_run`."""
    output_dir = training_args.output_dir
    step = json.loads((Path(trained) / "trainer_state.json").read_text())["global_step"]
    if not status.done("save", step):
        status.enter("save")
        if trained == last_checkpoint:
            copied = final_model_from_checkpoint(last_checkpoint, output_dir)
            write_model_card_if_missing(output_dir, model_args.model_name_or_path, script_args.dataset_name)
            logger.warning(
                "The final save of step %d had not happened (preempted at the last step, or killed while saving): "
                "saved %s from %s as the final model.", step, ", ".join(copied), last_checkpoint,
            )  # fmt: skip
        else:
            logger.info("The final model of step %d in %s was saved by an earlier launch.", step, output_dir)
        status.record("save", step, source=str(trained))
    return close_run(status, step, lambda: summary_from_checkpoint(trained, output_dir), training_args, push_to_hub)


def close_run(status, step, make_summary, training_args, push_to_hub) -> int:
    """Rank 0, after the final save: the summary, then the push, each skipped when an earlier launch did it at this
    step. Returns the exit code: 0 only once the model is saved and, when asked, pushed."""
    output_dir, hub_model_id = training_args.output_dir, training_args.hub_model_id
    if not status.done("summary", step):
        status.enter("summary")
        summary = make_summary()
        save_summary(summary, output_dir)
        write_report_or_log(output_dir, logger)
        logger.info(summary_text(summary))
        status.record("summary", step)
    if push_to_hub and not status.done("push", step, repo=hub_model_id):
        status.enter("push")
        logger.info("Pushing the final model of step %d to %s", step, hub_model_id)
        try:
            commit = push_final_model(output_dir, hub_model_id, training_args.hub_private_repo)
        except Exception as e:  # noqa: BLE001 - the local save stands; the status and the exit code say what failed
            message = redact(
                f"Push to {hub_model_id} failed ({type(e).__name__}: {e}). The model is saved in {output_dir}; run "
                "the same command again to retry the push (nothing is trained again)."
            )
            logger.error(message)
            status.end("failed", message)
            return PUSH_FAILED_EXIT_CODE
        status.record("push", step, repo=hub_model_id, commit=commit)
        logger.info("Pushed to %s: %s", hub_model_id, commit)
    pushed = f" and pushed to {hub_model_id}" if push_to_hub else ""
    status.end("done", f"final model of step {step} saved in {output_dir}{pushed}")
    return 0


if __name__ == "__main__":
    refuse_token_arguments(sys.argv[1:])  # before parsing: not even a parse error may echo a token
    load_secrets()  # before parsing, so .env can set WANDB_PROJECT and friends
    quiet_known_noise()  # DeepSpeed's and accelerate's known notices: dropped, noted once (sfm_dpo/compat.py)
    sys.argv[1:] = renamed_args(sys.argv[1:])  # transformers' deprecated argument names -> the new ones, logged
    sys.exit(main(*make_parser().parse_args_and_config()))
