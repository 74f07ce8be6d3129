"""Attribute accuracy of the bundled discrete model: classifier-free guidance vs first-order discrete
classifier guidance (issue 17, row 4). Uses fastdiff.evaluation's scorers and encoding, as ``fastdiff eval``.

    PYTHONPATH=. nice -n 10 python scripts/discrete_guidance_eval.py --samples 64 --steps 16

One JSON line per setting: per-label accuracy under the bundled classifier (which is also the guiding
classifier in the CG rows, so those rows are optimistic), and the mean generative perplexity under the
bundled causal LM. Seed 0, one thread."""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastdiff import evaluation, metrics
from fastdiff.pipeline import TextDiffusion

SETTINGS = [  # (name, condition the model on the label, CFG scale, classifier-guidance scale)
    ("conditional", True, 1.0, 0.0), ("CFG 2", True, 2.0, 0.0), ("CFG 3", True, 3.0, 0.0),
    ("unconditional", False, 1.0, 0.0), ("uncond + CG 3", False, 1.0, 3.0), ("uncond + CG 10", False, 1.0, 10.0),
    ("conditional + CG 3", True, 1.0, 3.0),
]


def main(samples: int, steps: int) -> None:
    torch.set_num_threads(1)
    td = TextDiffusion.load("discrete")
    clf = evaluation.load_scorer("classifier")
    lm = evaluation.load_scorer("causal_lm")
    for name, cond, cfg, cg in SETTINGS:
        per, ppl, t0 = {}, [], time.time()
        for idx, lab in enumerate(td.label_names):
            kw = {"classifier_grad": clf.guidance_grad(idx), "classifier_scale": cg} if cg else {}
            g = td.generate(samples, steps=steps, seed=0, label=lab if cond else None, guidance=cfg, **kw)
            toks = evaluation.encode_texts(g.texts, td.tokenizer, td.seq_len)
            with torch.inference_mode():
                per[lab] = metrics.attribute_accuracy(clf, toks, torch.full((samples,), idx))
            ppl.append(evaluation.score_texts(g.texts, td.tokenizer, lm=lm, length=td.seq_len)["gen_ppl"])
        print(json.dumps({"setting": name, "per_label": per, "mean": sum(per.values()) / len(per),
                          "gen_ppl": sum(ppl) / len(ppl), "time_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="samples per label")
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()
    main(a.samples, a.steps)
