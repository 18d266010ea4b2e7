"""Report of one run, or several side by side: report.md and PNG plots of the per-step logs (trainer_state.json).

    python scripts/report.py outputs/demo                       # -> outputs/demo/report.md, outputs/demo/plots/*.png
    python scripts/report.py outputs/dpo/A outputs/dpo/B        # -> outputs/dpo/comparison/report.md
    python scripts/report.py outputs/dpo/A outputs/dpo/B --out reports/lr_sweep

Works on a running job too (from its newest complete checkpoint). See sfm_dpo/run_report.py.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfm_dpo.run_report import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dirs", nargs="+", help="output folders of runs (a sweep's points)")
    parser.add_argument("--out", help="where report.md and plots/ go (default: the run's folder; several runs: "
                        "comparison/ beside them)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        path = write_report(args.output_dirs, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
