"""LD4LG latent diffusion (fastdiff.latent) on the bundled corpus: the driver of the measured run.

The run in benchmarks/results/eval-latent.json was made with exactly these commands (CPU, one thread,
wall-time caps because the machine was shared; every stage writes into one checkpoint directory):

    D=/work/runs/latent/ckpt
    python scripts/latent_diffusion.py stage plm --out $D --minutes 11         # BART-style PLM, 15% token masking
    python scripts/latent_diffusion.py plm-copy --out $D --minutes 9           # the same PLM, mask rate 0 (copying)
    python scripts/latent_diffusion.py copycheck --out $D                      # the PLM's own round trip
    python scripts/latent_diffusion.py stage ae --out $D --minutes 10          # compressor + reconstructor
    python scripts/latent_diffusion.py stage diffusion --out $D --minutes 7    # SED denoiser on the latents
    fastdiff eval -c $D --samples 64 --steps 64 --threads 1 --json benchmarks/results/eval-latent.json
    python scripts/latent_diffusion.py control --out $D --json benchmarks/results/eval-latent.json

``control`` adds a "controls" entry to that JSON: the same scores of texts the frozen decoder produces from
latents that carry no information about any text (Gaussian vectors, normalised like the compressor's
output), and from the latents of real held-out chunks (the autoencoder's round trip). The first says how much
of the generated text's fluency comes from the decoder's own language model rather than from the diffusion.

``stage`` calls :func:`fastdiff.latent.run_stages` (what ``fastdiff train --family latent --stage S`` runs)
with batch 16, a wall-time cap and no copy phase in stage plm (``plm-copy`` is that phase here); the step
counts reached are in the checkpoint's latent.json and train_log.jsonl. Without time caps, the command line
runs the same phases (stage plm's copy phase is ``LatentConfig.plm_copy_steps``, lr ``plm_copy_lr``):

    fastdiff train --family latent --out runs/latent --batch-size 16 --threads 1 \\
        --set plm_steps=777 --set plm_copy_steps=1149 --set ae_steps=985 --set diffusion_steps=3444

(the PLM phases' learning rate is constant after the warm-up either way; the ae and diffusion stages' cosine
decay spans their step count, 100000 in the capped runs, so those two stages are not the same run). The
shipped copy of this run is ``fastdiff/assets/latent`` (``fastdiff generate -c latent``; its command.txt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdiff.data import python_docs  # noqa: E402
from fastdiff.latent import PLM, LatentConfig, latent_data, run_stages, train_plm  # noqa: E402


def _say(t0: float) -> "callable":
    return lambda s: print(f"{time.time() - t0:7.1f} {s}", flush=True)


def cmd_stage(a: argparse.Namespace) -> None:
    cfg = LatentConfig(seq_len=a.seq_len, batch_size=a.batch_size, plm_steps=100000, plm_copy_steps=0,
                       ae_steps=100000, diffusion_steps=100000)
    run_stages(cfg, a.out, stage=a.stage, max_seconds=a.minutes * 60, log_every=25, print_fn=_say(time.time()))


def cmd_plm_copy(a: argparse.Namespace) -> None:
    """More training of the checkpoint's PLM with mask rate ``--mask-rate`` (0: plain copying), saved in place."""
    d = Path(a.out) / "plm"
    p = PLM.load(d)
    x = latent_data(python_docs(), p, a.seq_len, "lm", "train")[0]
    rows = train_plm(p, x, steps=100000, batch_size=a.batch_size, lr=2e-3, warmup=50, mask_rate=a.mask_rate, seed=1,
                     max_seconds=a.minutes * 60, log_every=25, print_fn=_say(time.time()), stage="plm-copy")
    p.save(d)
    with open(Path(a.out) / "train_log.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def cmd_copycheck(a: argparse.Namespace) -> None:
    """The PLM's own round trip (encoder states of held-out chunks -> greedy decoding)."""
    p = PLM.load(Path(a.out) / "plm")
    x = latent_data(python_docs(), p, a.seq_len, "lm", "valid")[0][:a.rows]
    out = p.generate(p.encode(x), a.seq_len)
    print(json.dumps({"rows": x.shape[0], "token_accuracy": float((out == x).float().mean()),
                      "exact_match": float((out == x).all(1).float().mean())}))
    print(repr(p.decode(x[:1])[0]))
    print(repr(p.decode(out[:1])[0]))


def cmd_control(a: argparse.Namespace) -> None:
    from fastdiff import evaluation
    from fastdiff.data import default_tokenizer
    from fastdiff.latent import LatentDiffusion

    m = LatentDiffusion.load(a.out)
    lm = evaluation.load_scorer("causal_lm")
    tok = default_tokenizer()
    c = m.autoencoder.config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(a.samples, c["n_latents"], c["d_latent"], generator=g)
    z = torch.nn.functional.layer_norm(z, z.shape[-1:]) * m.scale
    noise_texts = m.plm.decode(m.decode_latents(z))
    x = latent_data(python_docs(), m.plm, m.seq_len, "attribute" if m.num_labels else "lm", "valid")[0][:a.samples]
    round_trip = m.plm.decode(m.reconstruct(x))
    controls = {"random_latents": {**evaluation.score_texts(noise_texts, tok, lm=lm, length=m.seq_len),
                                   "examples": noise_texts[:3]},
                "round_trip_of_real_chunks": {**evaluation.score_texts(round_trip, tok, lm=lm, length=m.seq_len),
                                              "rows": int(x.shape[0]), "examples": round_trip[:3]}}
    print(json.dumps(controls, indent=1))
    if a.json:
        res = json.loads(Path(a.json).read_text(encoding="utf-8"))
        res["controls"] = controls
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("stage", "plm-copy", "copycheck", "control"):
        p = sub.add_parser(name)
        if name == "stage":
            p.add_argument("stage", choices=("plm", "ae", "diffusion"))
        p.add_argument("--out", required=True)
        p.add_argument("--seq-len", type=int, default=64)
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--minutes", type=float, default=10.0)
        p.add_argument("--mask-rate", type=float, default=0.0)
        p.add_argument("--rows", type=int, default=32)
        p.add_argument("--samples", type=int, default=64)
        p.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"stage": cmd_stage, "plm-copy": cmd_plm_copy, "copycheck": cmd_copycheck, "control": cmd_control}[a.cmd](a)


if __name__ == "__main__":
    main()
