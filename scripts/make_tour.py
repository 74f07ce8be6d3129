"""The README tour's figures: ``docs/schedules.png`` (the six noise schedules) and
``docs/trajectory.md`` (the bundled discrete model's text after each denoising step).

    PYTHONPATH=. python scripts/make_tour.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from fastdiff import schedules
from fastdiff.data import corpus, default_tokenizer
from fastdiff.pipeline import TextDiffusion

DOCS = Path(__file__).resolve().parent.parent / "docs"


def schedule_plot(T: int = 1000) -> Path:
    tok = default_tokenizer()
    counts = Counter()
    for ids in tok.encode_batch([d.text for d in corpus.python_docs()]):
        counts.update(ids)
    c = torch.tensor([counts.get(i, 0) for i in range(tok.vocab_size)], dtype=torch.float64)
    adaptive = schedules.adaptive(T, base="sqrt", momentum=0.0)
    # a refit on a synthetic loss that saturates early in t (loss = 1 - alpha_bar^4): it spreads the
    # steps evenly over the loss, as SeqDiffuSeq's adaptive schedule does with the real training loss
    adaptive.record(torch.arange(1, T + 1), 1 - adaptive.alpha_bar[1:] ** 4)
    adaptive.refit()
    items = {
        "linear (DDPM)": schedules.linear(T),
        "cosine (improved DDPM)": schedules.cosine(T),
        "sqrt (Diffusion-LM)": schedules.sqrt(T),
        "mutual_info, absorbing (D3PM)": schedules.mutual_info(T),
        "spindle (DiffusionBERT)": schedules.spindle(T, schedules.token_information(c)),
        "adaptive (SeqDiffuSeq), 1 refit": adaptive,
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    DOCS.mkdir(exist_ok=True)
    path = DOCS / "schedules.png"
    fig, ax = plt.subplots(figsize=(7.5, 4))
    schedules.plot_schedules(items, ax=ax)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"alpha_bar(t), T = {T} (spindle: mean over tokens, band = min..max)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def trajectory(steps: int = 16, seed: int = 0) -> Path:
    td = TextDiffusion.load("discrete")
    gen = td.generate(1, steps=steps, seed=seed, trajectory=True)
    head = (f"`fastdiff generate --steps {steps} --seed {seed} -n 1 --trajectory` on the bundled discrete model "
            "(absorbing, ancestral sampling at its recommended temperature 0.9; `_` is [MASK]):")
    lines = [head, ""]
    for k, step in enumerate(gen.trajectory):
        lines.append(f"- step {k + 1:>2}: {step[0]}")
    path = DOCS / "trajectory.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(schedule_plot())
    print(trajectory())
