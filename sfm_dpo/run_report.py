"""The run report: `report.md` and PNG plots of a run's per-step logs, or of several runs side by side.

The numbers come from the Trainer's `trainer_state.json` (`log_history`): the output folder's for a finished run, the
newest complete checkpoint's for a running one (whichever is further along). Training logs are every `logging_steps`
(means over the window); held-out logs (`eval_*`, sfm_dpo/evaluation.py) every `eval_steps` and after the last step.
One figure per metric; with several runs, one colour per run (train solid, held-out dashed with markers). What was
plotted is written beside the figures as `report_data.json`, so that tests and scripts read the same numbers.

    python scripts/report.py outputs/demo                        # -> outputs/demo/report.md, outputs/demo/plots/
    python scripts/report.py outputs/dpo/A outputs/dpo/B --out outputs/sweep_report
"""

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .checkpoints import latest_complete_checkpoint

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
DATA_FILE = "report_data.json"
# What of the report the Hub push uploads (sfm_dpo.credentials.pushed_files), as paths in the output folder. It holds
# the logged figures, the folder, model and data paths and the recipe's learning rate and beta, no environment.
REPORT_FILES = (REPORT_FILE, f"{PLOTS_DIR}/*.png", f"{PLOTS_DIR}/{DATA_FILE}")


@dataclass(frozen=True)
class Figure:
    name: str  # file stem
    title: str
    ylabel: str  # with units
    series: tuple[tuple[str, str], ...]  # (log key, legend label)
    log_y: bool = False


FIGURES = (
    Figure("loss", "DPO loss", "loss (nats)", (("loss", "train"), ("eval_loss", "held-out"))),
    Figure(
        "accuracies",
        "Reward accuracy",
        "share of pairs, chosen reward > rejected",
        (
            ("rewards/accuracies", "train"),
            ("eval_rewards/accuracies", "held-out"),
            ("rewards_norm/accuracies", "train, length-normalized"),
            ("eval_rewards_norm/accuracies", "held-out, length-normalized"),
        ),
    ),  # fmt: skip
    Figure(
        "margins",
        "Reward margin, summed log-ratios (rewards/margins)",
        "beta x nats per pair",
        (("rewards/margins", "train"), ("eval_rewards/margins", "held-out")),
    ),  # fmt: skip
    Figure(
        "margins_norm",
        "Reward margin, per-token log-ratios (rewards_norm/margins)",
        "beta x nats per token",
        (("rewards_norm/margins", "train"), ("eval_rewards_norm/margins", "held-out")),
    ),  # fmt: skip
    Figure(
        "logratios",
        "Log-prob change from the reference (policy - reference, summed)",
        "nats per completion",
        (
            ("logratios/chosen", "chosen, train"),
            ("logratios/rejected", "rejected, train"),
            ("eval_logratios/chosen", "chosen, held-out"),
            ("eval_logratios/rejected", "rejected, held-out"),
        ),
    ),  # fmt: skip
    Figure("learning_rate", "Learning rate", "learning rate", (("learning_rate", "learning rate"),)),
    Figure(
        "tokens_per_second",
        "Training throughput",
        "real tokens / s, all ranks",
        (("tokens_per_second", "training steps"),),
    ),  # fmt: skip
    Figure("step_time", "Optimizer step time", "seconds per step", (("step_time_s", "training steps"),)),
    Figure(
        "nonfinite_steps", "Non-finite steps (skipped), cumulative", "steps", (("nonfinite_steps", "skipped steps"),)
    ),
)

# The table of the report: (log key, column title, format)
HEADLINE = (
    ("loss", "train loss", ".4f"),
    ("eval_loss", "held-out loss", ".4f"),
    ("eval_rewards/accuracies", "held-out accuracy", ".3f"),
    ("eval_rewards_norm/margins", "held-out margin/token", ".4f"),
    ("eval_logratios/chosen", "held-out Δ chosen", ".2f"),
    ("eval_logratios/rejected", "held-out Δ rejected", ".2f"),
    ("tokens_per_second", "tokens/s", ",.0f"),
    ("nonfinite_steps", "non-finite steps", "d"),
)


@dataclass
class Run:
    label: str
    output_dir: Path
    state_path: Path
    state: dict
    config: dict
    eval_pairs: int | None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """`(steps, values)` of `key` over the log, finite values only."""
        points = [
            (entry["step"], float(entry[key]))
            for entry in self.state.get("log_history", [])
            if key in entry and "step" in entry and isinstance(entry[key], (int, float))
        ]
        points = [(s, v) for s, v in points if math.isfinite(v)]
        return [s for s, _ in points], [v for _, v in points]

    def last(self, key: str):
        _, values = self.series(key)
        return values[-1] if values else None


def find_state(output_dir: str | Path) -> Path:
    """The trainer_state.json furthest along: the output folder's (written at the end of a run) or the newest complete
    checkpoint's (a running or preempted run)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} is not a folder; give a run's output_dir.")
    candidates = [output_dir / STATE_FILE]
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint:
        candidates.append(Path(checkpoint) / STATE_FILE)
    found = [(json.loads(p.read_text()).get("global_step", 0), i, p) for i, p in enumerate(candidates) if p.exists()]
    if not found:
        raise FileNotFoundError(
            f"No {STATE_FILE} in {output_dir} nor in a complete checkpoint of it yet: a running job writes its first "
            "at the first save_steps."
        )
    return max(found, key=lambda t: (t[0], -t[1]))[2]


def load_run(output_dir: str | Path, label: str | None = None) -> Run:
    output_dir = Path(output_dir)
    state_path = find_state(output_dir)
    config_path = output_dir / "run_config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    split_path = output_dir / "eval_split.json"
    eval_pairs = json.loads(split_path.read_text())["eval_pairs"] if split_path.exists() else None
    return Run(
        label or output_dir.name, output_dir, state_path, json.loads(state_path.read_text()), config, eval_pairs
    )


def _labels(dirs: list[Path]) -> list[str]:
    """Folder names, or more of each path where names repeat (sweeps put runs in outputs/dpo/NAME)."""
    for depth in range(1, max(len(d.parts) for d in dirs) + 1):
        labels = ["/".join(d.parts[-depth:]) for d in dirs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in dirs]


def plot_figures(runs: list[Run], plots_dir: Path) -> dict:
    """One PNG per figure with data; returns what was plotted, `{figure: {"title", "ylabel", "file", "lines":
    [{"run", "key", "label", "steps", "values"}]}}`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = {}
    for figure in FIGURES:
        lines = []
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        # One run: a colour per quantity, its training and held-out lines alike. Several: a colour per run.
        quantities = list(dict.fromkeys(key.removeprefix("eval_") for key, _ in figure.series))
        for r, run in enumerate(runs):
            for key, label in figure.series:
                steps, values = run.series(key)
                if not steps:
                    continue
                held_out = key.startswith("eval_")
                name = label if len(runs) == 1 else f"{run.label}: {label}"
                colour = colours[(r if len(runs) > 1 else quantities.index(key.removeprefix("eval_"))) % len(colours)]
                style = {"linestyle": "--", "marker": "o", "markersize": 4} if held_out else {"linestyle": "-"}
                if len(runs) > 1 and len(figure.series) > 2 and "rejected" in key:
                    style["linestyle"] = ":" if not held_out else "-."
                if len(steps) == 1:
                    style["marker"] = style.get("marker", "o")
                ax.plot(steps, values, color=colour, label=name, **style)
                lines.append({"run": run.label, "key": key, "label": label, "steps": steps, "values": values})
        if not lines:
            plt.close(fig)
            continue
        ax.set_title(figure.title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(figure.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = plots_dir / f"{figure.name}.png"
        fig.savefig(path)
        plt.close(fig)
        plotted[figure.name] = {"title": figure.title, "ylabel": figure.ylabel, "file": path.name, "lines": lines}
    return plotted


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return format(int(value) if fmt == "d" else value, fmt)


def render_markdown(runs: list[Run], plotted: dict, plots_rel: str) -> str:
    lines = ["# Run report" if len(runs) == 1 else f"# Run comparison: {len(runs)} runs", ""]
    lines += ["| run | step | " + " | ".join(title for _, title, _ in HEADLINE) + " |",
              "|---|---|" + "---|" * len(HEADLINE)]  # fmt: skip
    for run in runs:
        step = f"{run.state.get('global_step')} of {run.state.get('max_steps')}"
        cells = [_cell(run.last(key), fmt) for key, _, fmt in HEADLINE]
        lines.append(f"| {run.label} | {step} | " + " | ".join(cells) + " |")
    lines += ["", "Last logged values. Held-out Δ: mean over the held-out pairs of the policy's minus the reference's "
              "summed log-prob of each completion (nats); both falling while the margin grows is the known DPO "
              "failure of pushing the chosen completions down too.", ""]  # fmt: skip
    for run in runs:
        args = run.config.get("training_args", {})
        model = run.config.get("model_args", {}).get("model_name_or_path", "?")
        data = run.config.get("script_args", {}).get("dataset_name", "?")
        held_out = f"{run.eval_pairs} held-out pairs (eval_split.json)" if run.eval_pairs else "no held-out split"
        lines.append(
            f"- **{run.label}**: `{run.output_dir}`; numbers from `{run.state_path}`; model `{model}`, data `{data}`, "
            f"learning rate {args.get('learning_rate', '?')}, beta {args.get('beta', '?')}, "
            f"{run.config.get('world_size', '?')} processes; {held_out}."
        )
    lines.append("")
    for name, entry in plotted.items():
        lines += [f"## {entry['title']}", "", f"![{name}]({plots_rel}/{entry['file']})", ""]
    missing = [f.name for f in FIGURES if f.name not in plotted]
    if missing:
        lines += [f"Not logged by these runs: {', '.join(missing)}.", ""]
    return "\n".join(lines)


def write_report(output_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Writes `report.md`, `plots/*.png` and `plots/report_data.json` to `out_dir` (default: the run's own folder for
    one run; for several, `comparison/` beside them). Returns the path of report.md."""
    dirs = [Path(d) for d in output_dirs]
    if not dirs:
        raise ValueError("Give at least one output folder.")
    runs = [load_run(d, label) for d, label in zip(dirs, _labels([d.resolve() for d in dirs]))]
    if out_dir is None:
        out_dir = dirs[0] if len(dirs) == 1 else Path(*_common_parent(dirs)) / "comparison"
    out_dir = Path(out_dir)
    plots_dir = out_dir / PLOTS_DIR
    plotted = plot_figures(runs, plots_dir)
    (plots_dir / DATA_FILE).write_text(json.dumps(plotted, indent=1) + "\n")
    path = out_dir / REPORT_FILE
    path.write_text(render_markdown(runs, plotted, PLOTS_DIR))
    return path


def _common_parent(dirs: list[Path]) -> tuple[str, ...]:
    parts = [d.resolve().parts for d in dirs]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return tuple(common) or (".",)


def write_report_or_log(output_dir: str | Path, log=logger) -> Path | None:
    """The end-of-run report: a failure to plot is logged, not raised (the model is saved by then)."""
    try:
        path = write_report([output_dir])
    except Exception as e:  # noqa: BLE001 - the run's result stands; the report can be made again on demand
        log.error(
            "Could not write the run report (%s: %s); make it with: python scripts/report.py %s",
            type(e).__name__, e, output_dir,
        )  # fmt: skip
        return None
    log.info("Run report: %s", path)
    return path
