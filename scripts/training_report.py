"""Loss curves and per-run figures of training runs: ``benchmarks/results/training-curves.png`` and a JSON
summary (steps, time, final and best validation losses, the step kept by ``--keep-best``).

    .venv/bin/python scripts/training_report.py NAME=RUN_DIR [NAME=RUN_DIR ...] [--out PREFIX]

Each ``RUN_DIR`` holds a ``train_log.jsonl`` (``fastdiff train``'s log: training lines every
``--log-every`` steps, validation lines every ``--eval-every``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def read(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "valid_loss" in r]


def summary(run: Path) -> dict:
    train, valid = read(run)
    out: dict = {"run": str(run), "steps": train[-1]["step"] if train else 0,
                 "elapsed_s": round(train[-1]["elapsed"], 1) if train else 0.0,
                 "final_train_loss": train[-1]["loss"] if train else None}
    if valid:
        key = "valid_ema_loss" if "valid_ema_loss" in valid[0] else "valid_loss"
        best = min(valid, key=lambda r: r[key])
        out.update(selection_metric=key, best_step=best["step"], best_valid=best[key], final_valid=valid[-1][key],
                   valid=[{k: v for k, v in r.items() if k == "step" or k.startswith("valid")} for r in valid])
    best_dir = run / "best" / "config.json"
    if best_dir.is_file():
        out["kept_step"] = json.loads(best_dir.read_text())["step"]
    return out


def plot(runs: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items()):
        train, valid = read(run)
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
        for key, style in (("valid_loss", "o-"), ("valid_ema_loss", "s-")):
            pts = [(r["step"], r[key]) for r in valid if key in r]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, lw=1, label=key.replace("_", " "))
        kept = run / "best" / "config.json"
        if kept.is_file():
            ax.axvline(json.loads(kept.read_text())["step"], color="grey", ls=":", label="kept (best)")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    ap.add_argument("--out", default=str(RESULTS / "training"), help="output prefix (.png, .json)")
    args = ap.parse_args()
    runs = {}
    for item in args.runs:
        name, _, d = item.partition("=")
        runs[name] = Path(d)
    out = Path(args.out)
    plot(runs, out.with_name(out.name + "-curves.png"))
    data = {name: summary(run) for name, run in runs.items()}
    out.with_name(out.name + "-runs.json").write_text(json.dumps(data, indent=1) + "\n")
    for name, s in data.items():
        print(name, {k: v for k, v in s.items() if k != "valid"})


if __name__ == "__main__":
    main()
