"""One real run with a held-out split (scripts/launch.sh demo: 2 processes, DeepSpeed ZeRO-2, CPU) and what it leaves:
eval_split.json, the held-out figures in the logs and the summary, equal to a recomputation by hand on the final
model (so each held-out pair was evaluated exactly once across the two ranks), and the run report (report.md, a PNG
per metric with data points), also for a running job (newest checkpoint) and for two runs side by side. The run
(tests/conftest.py's `held_out_run`) also compiles its decoder layers, for tests/test_train_e2e.py: the figures are
recomputed here in eager float32."""

import json
import math
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from sfm_dpo.data import prepare_dataset
from sfm_dpo.run_report import FIGURES, find_state, write_report
from tests.conftest import HELD_OUT_RUN_ROWS, REPO

TRAIN_SAMPLES = HELD_OUT_RUN_ROWS


@pytest.fixture(scope="module")
def demo_run(held_out_run):
    """tests/conftest.py's run to its end with a held-out split (its layers compiled: tests/test_train_e2e.py)."""
    return held_out_run


@torch.no_grad()
def summed_logps(model, row: dict) -> tuple[float, float]:
    """Summed completion log-probs, each sequence alone in a plain unpacked forward."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([row["prompt_ids"] + row[side]])
        logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(logps[len(row["prompt_ids"]) - 1 :].sum().item())
    return out[0], out[1]


def test_held_out_figures_equal_a_recomputation_on_the_final_model(demo_run, demo_assets):
    output_dir, log = demo_run
    split = json.loads((output_dir / "eval_split.json").read_text())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    # At the start (eval_on_start), every eval_steps (4) and after the last step.
    assert [e["step"] for e in evals] == [0, 4, state["global_step"]]
    # Step 0: the policy is still the reference, whose cached log-probs the eval rows carry (each rank its own share).
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[0]["eval_rewards_norm/margins"] == pytest.approx(0.0, abs=1e-5)
    final = evals[-1]
    assert final["eval_pairs"] == split["eval_pairs"] == len(split["pair_ids"]) > 0

    # The held-out rows as training tokenized them, from the recipe's settings.
    recipe = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    script_args = SimpleNamespace(
        dataset_name=str(demo_assets["think"]), dataset_config=None, dataset_train_split="train",
        max_train_samples=TRAIN_SAMPLES, skip_invalid_rows=False, keep_degenerate_pairs=False,
        max_prompt_length=recipe["max_prompt_length"], overlong_policy=recipe["overlong_policy"],
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(demo_assets["model"])
    dataset, _ = prepare_dataset(script_args, SimpleNamespace(dataset_num_proc=None, max_length=recipe["max_length"]),
                                 tokenizer)  # fmt: skip
    held_out = set(split["pair_ids"])
    rows = [r for r in dataset if r["pair_id"] in held_out]
    assert len(rows) == final["eval_pairs"]
    assert sum(1 for r in dataset if r["pair_id"] not in held_out) == split["train_pairs"]

    reference = AutoModelForCausalLM.from_pretrained(demo_assets["model"], dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32).eval()
    beta = recipe["beta"]
    chosen, rejected, n_chosen, n_rejected = [], [], [], []
    for row in rows:
        (pc, pr), (rc, rr) = summed_logps(policy, row), summed_logps(reference, row)
        chosen.append(pc - rc)
        rejected.append(pr - rr)
        n_chosen.append(len(row["chosen_ids"]))
        n_rejected.append(len(row["rejected_ids"]))
    chosen, rejected = torch.tensor(chosen), torch.tensor(rejected)
    norm_margin = beta * (chosen / torch.tensor(n_chosen) - rejected / torch.tensor(n_rejected))
    expected = {
        "eval_loss": (-F.logsigmoid(norm_margin)).mean(),  # sigmoid_norm, the recipe's loss
        "eval_rewards/accuracies": (chosen > rejected).float().mean(),
        "eval_rewards/margins": (beta * (chosen - rejected)).mean(),
        "eval_rewards_norm/margins": norm_margin.mean(),
        "eval_logratios/chosen": chosen.mean(),
        "eval_logratios/rejected": rejected.mean(),
    }
    assert expected["eval_loss"] < math.log(2) - 0.05  # trained: a real difference from the reference
    for key, value in expected.items():
        assert final[key] == pytest.approx(value.item(), rel=1e-3, abs=1e-3), key

    summary = json.loads((output_dir / "run_summary.json").read_text())
    assert summary["held_out_pairs"] == final["eval_pairs"]
    assert summary["held_out"]["eval_loss"][1] == pytest.approx(final["eval_loss"])
    assert "held-out pairs:" in log and "eval_rewards/accuracies: first" in log


def test_the_report_plots_every_metric_with_data(demo_run):
    output_dir, log = demo_run
    report = (output_dir / "report.md").read_text()  # written at the end of the run
    plotted = json.loads((output_dir / "plots" / "report_data.json").read_text())
    assert set(plotted) == {f.name for f in FIGURES}, "a figure without data"
    for name, entry in plotted.items():
        png = output_dir / "plots" / entry["file"]
        assert png.stat().st_size > 10_000, name
        assert f"![{name}](plots/{entry['file']})" in report
        assert entry["lines"] and all(len(line["steps"]) == len(line["values"]) >= 2 for line in entry["lines"]), name
    keys = {line["key"] for entry in plotted.values() for line in entry["lines"]}
    assert {"loss", "eval_loss", "eval_logratios/chosen", "eval_logratios/rejected", "tokens_per_second"} <= keys
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # The plotted numbers are the log's.
    eval_losses = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    (line,) = [line for line in plotted["loss"]["lines"] if line["key"] == "eval_loss"]
    assert line["values"] == eval_losses
    assert all(v > 0 for entry in ("tokens_per_second", "step_time") for v in plotted[entry]["lines"][0]["values"])


def test_report_of_a_running_job_and_of_two_runs(demo_run, tmp_path):
    """A running job has no trainer_state.json of its own yet: the newest complete checkpoint's is read. Two folders
    give one figure per metric with a line per run."""
    output_dir, _ = demo_run
    running = tmp_path / "running"
    shutil.copytree(output_dir, running)
    # As a job between its checkpoints 4 and 6: no final save, no checkpoint-6 yet.
    (running / "trainer_state.json").unlink()
    shutil.rmtree(running / f"checkpoint-{json.loads((output_dir / 'trainer_state.json').read_text())['global_step']}")
    assert find_state(running).parent.name == "checkpoint-4"
    write_report([running])
    plotted = json.loads((running / "plots" / "report_data.json").read_text())
    assert max(plotted["loss"]["lines"][0]["steps"]) == 4

    path = write_report([output_dir, running], tmp_path / "sweep")
    plotted = json.loads((tmp_path / "sweep" / "plots" / "report_data.json").read_text())
    for entry in plotted.values():
        assert {line["run"] for line in entry["lines"]} == {"run", "running"}
    assert "| run |" in path.read_text() and "| running | 4 of" in path.read_text()

    result = subprocess.run([str(REPO / ".venv/bin/python"), "scripts/report.py", str(tmp_path / "nothing")],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1 and "is not a folder" in result.stderr
