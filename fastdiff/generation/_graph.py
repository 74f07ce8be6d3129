"""CUDA graphs of whole generation steps in :func:`fastdiff.generate` (``cuda_graph=True``): the network's
forward on the step's window and the step's op (:func:`fastdiff.ops.select_tokens`'s CUDA kernel; for MDLM /
DUO the posterior kernel) captured in one ``torch.cuda.CUDAGraph`` per static shape, replayed every step.

Why: at small batches a decoding step is dozens of short kernel launches (the layers, the selection's
per-row kernel, its sorts), each paying the host's launch cost; one replay launches them all at once.

What is captured, per key (the batch and sequence length, the step's window of decided positions, the
model's parameter and buffer storage (addresses, dtypes, devices), and for the caches the window the
network runs on / the block): one :class:`GenerateGraphs` per ``generate`` call (its graphs are released
with it; a later call captures again), at most :data:`MAX_GRAPHS` entries, the least recently replayed
released first.

* static inputs, shared by every graph of the call: the sequence ``x (B, P + N)`` int64, the time input
  ``t`` (``(B,)``; ``(2B,)`` with LLaDA's guidance; a fastdiff denoiser's step, MDLM's sigma; ignored by
  time-free models), the per-row count ``k (B,)`` int64 (LLaDA's schedule, Dream's count), ``seed_offset
  (2,)`` int64 (the uint64 counter words' bits), Dream origin's probability ``p`` (float64), and for MDLM /
  DUO the posterior kernel's ``counters (3,)`` and the step's ``alpha_bar (3,)``; per graph, the uniforms
  (float64: ``remasking="random"``'s ``(B, W)``, Dream's ``(B, L)`` for ``alg_temp`` and origin,
  BD3-LM's block ``(B, b - a)``). Before each replay the loop copies the step's values into them (the
  uniforms are drawn outside the graph with the eager path's counters, in its order).
* the bodies, by preset:

  - LLaDA / Fast-dLLM: the forward (``cache=None``: the whole sequence, logits kept on ``[lo, e)``;
    ``cfg_scale > 0``: the eager loop's :func:`~fastdiff.generation._loops._guided` itself, the
    conditional and the prompt-masked batch in one call of ``2B`` rows and ``un + (cfg_scale + 1)(cond -
    un)`` in float32; the block's first step with ``cache="prefix"`` / ``"dual"``: ``kv_forward`` over the
    whole sequence, which also fills the cache; the later steps: ``kv_window`` over ``[s, L)`` (prefix) or
    ``[s, e)`` (dual) reading that cache), the candidates ``x == mask_id`` on the window, the counter rows,
    and ``fastdiff_cuda::select_rows_counters``: select_tokens' per-row kernel on every row of the window
    with ``(seed, offset)`` read from ``seed_offset`` (a kernel taking them as host ints would replay the
    captured ones), then, with ATen as select_tokens' binding does it, the candidates' tokens, scores and
    the top-k / threshold selection (:func:`select_dense`);
  - Dream: the forward with the logits of ``[P, L)`` (shifted), the same kernel with
    Dream's score (``maskgit_plus`` / ``topk_margin`` / ``entropy``) and top-``k`` selection, then the eager
    step's dense results (:func:`~fastdiff.generation._loops._dream_dense`: with ``alg_temp`` its
    Gumbel-top-``k``); ``alg="origin"``: the kernel's draw of every candidate and the eager coin ``u < p``;
  - MDLM / DUO: the forward on the whole sequence, the generated region's float32 logits (the mask column
    at ``-inf`` for MDLM), and ``fastdiff_cuda::posterior_counters`` (fastdiff.sample's graphs' kernel) on
    the plan of the step's schedule ``[1, 1 - move_s, 1 - move_t]`` read from ``alpha_bar``;
  - BD3-LM: per block, the forward (the model on ``x[:, :b]``, or with ``cache="kv"`` the block through the
    exact KV cache of that block), the float32 logits with the mask column at ``-inf``, the kernel's draw
    of every candidate, and the eager pick of one candidate per row (the argmax of the uniforms over the
    candidates, as a scatter).

  The kernel's draw at ``temperature > 0`` is sample_categorical's (select_tokens.cu forms its sums in
  sample_categorical.cu's thread order and calls the same ``cdf_draw``), so Dream origin's and BD3-LM's
  eager draws, made with sample_categorical on the host-gathered candidate rows, are the graph's; at
  temperature 0 both are the first maximum.
* static outputs: tokens, scores, the selection, each row's value status and the logits (MDLM: the drawn
  region and the logits).

Caches: the block's first step is its own graph (``kv_forward`` + selection) whose static outputs include
the cache it builds; the block's window graph is captured reading that cache object, so every replay of
the first-step graph (at the block's start, on that block's sequence) refreshes in place the keys and
values the window graph reads, as the eager loop's new ``kv_forward`` does. A window graph lives with its
block's first-step graph (released with it). The cache protocol's rule that ``kv_window`` does not modify
the cache is what makes the replays exact. BD3-LM's exact cache is extended between blocks on the host as
eagerly; each block's graph reads the cache of its block (kept with the graph). MDLM's cache (a step whose
input did not change reuses the last logits, no network call) reads the graph's static logits, unchanged
since its last replay, and runs the eager posterior op on them; MDLM's final argmax call stays eager.

Outside the graph, on the host, as the eager loop does it: which columns are masked (the window: part of
the key, so a step whose window moves replays another graph; LLaDA's windows are block-aligned and Dream's
is the whole generated region ``[P, L)``, so a run captures once per block, or once), the counts
(LLaDA's schedule, Dream's ``int(mean · (1 - s/t))``), the end of a block, the write of the selected
tokens into ``x`` and of the scores, and the value check: after each replay the candidates' status (NaN,
``+inf``, every logit ``-inf``; MDLM: the posterior op's check of its logits) raises the eager path's
:class:`~fastdiff.errors.InputError` before the tokens are used (the kernels draw nothing out of bounds
meanwhile). The tokens equal the eager path's exactly: the same network kernels on the same shapes, the
same per-row kernels, counters and selection.

Scope (:func:`unsupported`, checked before any network call; the same answer on every backend): every
preset; LLaDA / Fast-dLLM with top-k (LLaDA's schedule) or ``threshold`` selection, ``remasking``
``"low_confidence"`` or ``"random"``, ``cfg_scale``, ``cache`` None / ``"prefix"`` / ``"dual"``; Dream's
four algs with ``alg_temp``; MDLM / DUO with or without ``noise_removal``; BD3-LM with or without
``cache="kv"``; any temperature, padding, ``suppress_mask``, ``eos_token_id`` (applied after the loop; it
changes no shape), ``output_scores``, callbacks. Refused with ``InputError`` naming ``cuda_graph``:
``logits_processor`` (Python on the host between network and selection), ``top_k`` / ``top_p`` (Dream:
``top_p < 1``; the filtered draw runs on the host-gathered candidate rows) and Fast-dLLM's ``factor`` rule
(the gathered path: per-row draws and torch-computed scores on the host-gathered candidate rows, which the
kernel's scores match only to float32 rounding); then, on the device, tensors off CUDA and a ``backend``
whose kernel is not the CUDA one (``select_tokens``; MDLM / DUO ``posterior_sample``; Dream origin and
BD3-LM sampling also ``sample_categorical``: the graph's op must be the eager op's). A model that cannot be
captured (it reads tensor values on the host, synchronises, changes shapes with values) raises
``InputError`` naming ``cuda_graph`` at its first capture.

Statistics: ``network_calls`` and ``sequences_evaluated`` count one call per replay (``2B`` rows with
guidance), as the eager steps count theirs (the capture's calls are not counted); ``model_time_s`` is the
replays' time, which covers the op as well as the forward; ``stats["cuda_graph"]`` holds ``captures`` and
``replays``.

The device-independent plumbing (keys, static buffers, counters, cache pairing, status check, statistics)
runs on CPU in tests/test_generate_cuda_graph.py with a stand-in capture and ops; the CUDA path itself has
only been compile-checked where no GPU was at hand (the same file runs it on one).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import random as _random
from ..errors import InputError
from ..ops._common import check_finite_above
from ..ops._plan import KIND_ABSORBING, KIND_UNIFORM, PosteriorPlan, int64_bits
from ..ops.select_tokens import KERNEL, MODE_ALL, MODE_THRESHOLD, MODE_TOP_K, RULE_CODES
# as fastdiff.sample's step graphs: the capture, its error, the posterior kernel reading its counters on the device
from ..sampling._graph import CounterOp, capture_error, cuda_capture, cuda_counter_op
from . import _select as sel
from ._loops import _DREAM_RULES, _dream_dense, _guided

if TYPE_CHECKING:
    from ._loops import Run

#: top-level graphs kept per call (a cache's first-step graph counts once, with its window graph)
MAX_GRAPHS = 8

#: a capture: ``capture(body) -> (replay, outputs)``; ``replay()`` recomputes ``outputs`` in place
Capture = Callable[[Callable[[], tuple[torch.Tensor, ...]]], tuple[Callable[[], None], tuple[torch.Tensor, ...]]]
#: the selection op: ``op(logits, candidates, counter_rows, k, uniform, seed_offset, rule, temperature,
#: threshold, mode, exclude) -> (tokens, confidence, selected, status)``, all ``(B, W)``
SelectOp = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]

_STATUS_MESSAGES = {4: "model output: the logits contain NaN", 3: "model output: the logits contain +inf",
                    2: "model output: a position has every logit at -inf (no token can be drawn)"}


def unsupported(o: Any, processors: list) -> str | None:
    """Why a ``cuda_graph=True`` generation cannot be captured (None: it can), from the options alone."""
    if processors:
        return "logits_processor runs on the host between the network and the selection"
    if o.preset == "dream":
        if o.top_k is not None or (o.top_p is not None and o.top_p < 1):
            return "top_k / top_p filtering draws on the host-gathered candidate rows"
        return None
    if o.top_k is not None or o.top_p is not None:
        return "top_k / top_p filtering draws on the host-gathered candidate rows"
    if o.factor is not None:
        return ("Fast-dLLM's factor rule takes the gathered path (per-row draws and torch-computed scores on the "
                "host-gathered candidate rows, which the graph's kernel matches only to float32 rounding)")
    return None


def check_device(o: Any, device: torch.device) -> None:
    """The device half of the decision: CUDA tensors and, for the eager op, the CUDA kernel the graph
    replays (``select_tokens``'s; MDLM / DUO: ``posterior_sample``'s)."""
    op, kernel, entry = ("posterior_sample", "posterior", "posterior_counters") \
        if getattr(o, "preset", None) in ("mdlm", "duo") else ("select_tokens", KERNEL, "select_rows_counters")
    if device.type != "cuda":
        raise InputError(f"cuda_graph: CUDA graphs need a CUDA device; input_ids are on {device}")
    if o.backend not in ("auto", "cuda"):
        raise InputError(f"cuda_graph: backend {o.backend!r} is not the CUDA {op} kernel the graph replays "
                         "(use backend='auto' or 'cuda')")
    from ..ops import _dispatch

    try:
        name = _dispatch.choose(op, kernel, o.backend, str(device))
    except _dispatch.BackendUnavailableError as e:
        raise InputError(f"cuda_graph: {e}") from None
    if name != "cuda":
        raise InputError(f"cuda_graph: {op} runs on the {name!r} backend here (FASTDIFF_BACKEND or an "
                         "install without the CUDA extension); the graph replays the CUDA kernel")
    from ..ops.backends.cuda import _C

    if not hasattr(_C, entry):
        raise InputError(f"cuda_graph: the built CUDA extension predates {entry}; rebuild it "
                         "(python setup.py build_ext --inplace)")
    if ((o.preset == "dream" and o.alg == "origin") or o.preset == "bd3lm") and o.temperature > 0:
        try:  # these eager steps draw with sample_categorical; the graph's kernel reproduces the CUDA one
            draw = _dispatch.choose("sample_categorical", "sample_categorical", o.backend, str(device))
        except _dispatch.BackendUnavailableError as e:
            raise InputError(f"cuda_graph: {e}") from None
        if draw != "cuda":
            raise InputError(f"cuda_graph: sample_categorical runs on the {draw!r} backend here; the graph's draw "
                             "is the CUDA kernel's")


def select_dense(tok: torch.Tensor, key: torch.Tensor, status: torch.Tensor, candidates: torch.Tensor,
                 k: torch.Tensor | None, uniform: torch.Tensor | None, threshold: float, mode: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_tokens' output from per-row results on every row (``tok``, float64 ``key``, ``status``,
    ``(B, W)``): the candidates' tokens (0 elsewhere), float32 scores (``-inf`` elsewhere), the selection
    (ties to the lower position, candidates first: the two stable sorts of select_tokens' binding) and the
    candidates' status (0 elsewhere). Only device ops that read no value on the host (capturable)."""
    B, W = candidates.shape
    if uniform is not None:
        key = uniform.to(torch.float64)
    key = torch.where(candidates, key, torch.full((), float("-inf"), dtype=torch.float64, device=key.device))
    tokens = torch.where(candidates, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))
    conf = torch.where(candidates, key.float(), torch.full((), float("-inf"), dtype=torch.float32, device=key.device))
    status = torch.where(candidates, status, torch.zeros((), dtype=status.dtype, device=status.device))
    if mode == MODE_ALL:
        return tokens, conf, candidates.clone(), status
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(candidates.gather(1, order).to(torch.int8), dim=1, descending=True,
                                       stable=True).indices)
    if mode == MODE_TOP_K:
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(W, device=order.device).expand_as(order))
        return tokens, conf, candidates & (rank < k[:, None]), status
    chosen = candidates & (key >= threshold)
    if W:
        best = torch.zeros_like(chosen).scatter_(1, order[:, :1], True)
        chosen = chosen | (best & candidates.any(1, keepdim=True))
    return tokens, conf, chosen, status


def cuda_select(logits: torch.Tensor, candidates: torch.Tensor, counter_rows: torch.Tensor | None,
                k: torch.Tensor | None, uniform: torch.Tensor | None, seed_offset: torch.Tensor, rule: int,
                temperature: float, threshold: float, mode: int, exclude: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The graph's selection on CUDA: ``fastdiff_cuda::select_rows_counters`` then :func:`select_dense`."""
    from ..ops.backends.cuda.select_tokens import select_rows_counters

    tok, key, status = select_rows_counters(logits, counter_rows, rule, temperature, exclude, seed_offset)
    return select_dense(tok, key, status, candidates, k, uniform, threshold, mode)


class GenerateGraphs:
    """The captured steps of one ``generate`` call (see the module docstring). ``capture`` and ``op``
    default to :func:`cuda_capture` and :func:`cuda_select`; the tests pass stand-ins to run the plumbing
    on CPU."""

    def __init__(self, run: Run, *, capture: Capture | None = None, op: SelectOp | None = None,
                 posterior_op: CounterOp | None = None) -> None:
        self.run = run
        self.capture = capture or cuda_capture
        self.op = op or cuda_select
        self.posterior_op = posterior_op or cuda_counter_op
        o, lm = run.o, run.lm
        dev = run.x.device
        B = run.B
        self.x = run.x.clone()
        #: LLaDA's guidance runs the conditional and unconditional batch in one call of 2B rows
        self.cfg = o.preset in ("llada", "fast_dllm") and o.cfg_scale > 0
        self.call_rows = 2 * B if self.cfg else B
        self.t = torch.zeros(self.call_rows, dtype=torch.int64 if lm.fastdiff else torch.float32, device=dev)
        self.am2 = None if run.am is None or not self.cfg else torch.cat([run.am, run.am])
        self.pos2 = None if run.pos is None or not self.cfg else torch.cat([run.pos, run.pos])
        self.k = torch.zeros(B, dtype=torch.int64, device=dev)
        self.seed_offset = torch.zeros(2, dtype=torch.int64, device=dev)
        #: MDLM / DUO: the posterior kernel's (seed, offset, row_offset) and the step's alpha_bar table (3,)
        self.counters = torch.zeros(3, dtype=torch.int64, device=dev)
        self.alpha_bar = torch.ones(3, dtype=torch.float64, device=dev)
        self.is_dream = o.preset == "dream"
        self.is_bd3lm = o.preset == "bd3lm"
        self.origin = self.is_dream and o.alg == "origin"
        #: Dream origin's probability of deciding a masked position this step (float64, refreshed per step)
        self.p = torch.zeros((), dtype=torch.float64, device=dev)
        if self.origin or self.is_bd3lm:  # the kernel's draw of every candidate (its score unused), then
            self.rule = RULE_CODES["prob"]  # origin's coin per candidate / BD3-LM's one uniform position per row
            self.mode = MODE_ALL
        elif self.is_dream:  # Dream's confidence algs: top-k by its count, or every candidate for Gumbel-top-k
            self.rule = RULE_CODES[_DREAM_RULES[o.alg]]
            self.mode = MODE_ALL if o.alg_temp else MODE_TOP_K
        else:
            self.rule = RULE_CODES["random" if o.remasking == "random" else "llada"]
            self.mode = MODE_THRESHOLD if o.threshold is not None else MODE_TOP_K
        self.threshold = 0.0 if o.threshold is None else float(o.threshold)
        self.exclude = run.mask_id if o.suppress_mask or self.is_bd3lm else -1  # BD3-LM always suppresses it
        self.temperature = float(o.temperature)
        self.entries: OrderedDict[tuple, dict] = OrderedDict()  # least recently replayed first
        self._fill_entry: dict | None = None  # the current block's first-step graph (caches)
        self.captures = 0
        self.replays = 0

    def _weights(self) -> tuple:
        """The model's parameter and buffer storage (address, dtype, device): a callback that replaces a
        tensor of the model (rather than updating it in place) between steps makes the next step capture
        anew, since a graph reads the addresses it was captured with."""
        model = self.run.lm.model
        if not isinstance(model, torch.nn.Module):
            return ()
        return tuple((t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))

    # ---- the captured body ----------------------------------------------------------------------
    def _select(self, logits: torch.Tensor, c0: int, uniform: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        run = self.run
        W = logits.shape[1]
        if logits.stride(-1) != 1 and logits.shape[-1] != 1:
            logits = logits.contiguous()
        cand = self.x[:, c0:c0 + W] == run.mask_id
        rows = sel.rank_counters(cand, run.L) if self.temperature > 0 else None
        return self.op(logits, cand, rows, self.k if self.mode == MODE_TOP_K else None, uniform, self.seed_offset,
                       self.rule, self.temperature, self.threshold, self.mode, self.exclude) + (logits,)

    def _build(self, key: tuple, body: Callable[[], tuple[torch.Tensor, ...]]) -> dict:
        lm = self.run.lm
        calls, rows, seconds = lm.calls, lm.rows, lm.seconds
        try:
            if self.x.device.type == "cuda":
                with torch.cuda.device(self.x.device):  # the graph, its pool and side stream on the tensors' device
                    replay, outs = self.capture(body)
            else:
                replay, outs = self.capture(body)
        except InputError:
            raise
        except (RuntimeError, TypeError, ValueError) as e:
            raise capture_error(e) from e
        finally:
            lm.calls, lm.rows, lm.seconds = calls, rows, seconds  # the capture's calls are not the run's
        self.captures += 1
        return {"key": key, "replay": replay, "outs": outs, "windows": OrderedDict()}

    def _uniform(self, W: int) -> torch.Tensor | None:
        if self.rule != RULE_CODES["random"]:
            return None
        return torch.zeros(self.run.B, W, dtype=torch.float64, device=self.x.device)

    # ---- one step -----------------------------------------------------------------------------
    def _prepare(self, t: float | int, k: torch.Tensor | None, c0: int, entry: dict, p: float | None = None) -> None:
        """The step's values into the static inputs, drawing the counters in the eager path's order."""
        run = self.run
        self.x.copy_(run.x)
        self.t.fill_(int(t) if run.lm.fastdiff else float(t))
        if k is not None:
            self.k.copy_(k)
        if p is not None:
            self.p.fill_(p)
        u_offset = run.next_offset() if self.origin else None  # origin: its coins' uniforms, then the draw
        # Dream's confidence algs and BD3-LM draw no counter offset at temperature 0 (their eager steps
        # neither); LLaDA's and Dream origin's steps always take one
        always = not (self.is_dream or self.is_bd3lm) or self.origin
        offset = run.next_offset() if always or self.temperature > 0 else 0
        self.seed_offset.copy_(torch.tensor([int64_bits(run.seed), int64_bits(offset)], dtype=torch.int64))
        if entry["uniform"] is not None:
            W = entry["uniform"].shape[1]
            u_offset = run.next_offset() if u_offset is None else u_offset
            if self.is_bd3lm:  # the block's own (B, W) draw, as the eager step makes it
                entry["uniform"].copy_(_random.uniform((run.B, W), seed=run.seed, offset=u_offset,
                                                       device=self.x.device))
            else:
                u = _random.uniform((run.B, run.L), seed=run.seed, offset=u_offset, device=self.x.device)
                entry["uniform"].copy_(u[:, c0:c0 + W])

    def _replay(self, entry: dict, c0: int) -> torch.Tensor:
        """Replay a LLaDA / Fast-dLLM step's graph, check its values, write the decided tokens and scores
        into the run: the decided positions ``(B, W)`` of the window at ``c0``."""
        run = self.run
        tokens, conf, chosen = self._launch(entry, c0)[:3]
        W = tokens.shape[1]
        win = run.x[:, c0:c0 + W]
        run.x[:, c0:c0 + W] = torch.where(chosen, tokens, win)
        run.record(chosen, c0, conf)
        return chosen

    def _launch(self, entry: dict, c0: int) -> tuple[torch.Tensor, ...]:
        """Replay ``entry``'s graph (timed, counted as one network call), then raise the eager path's
        value error if the window's candidates had bad logits: the static outputs."""
        run = self.run
        self._play(entry)
        status, logits = entry["outs"][3:5]
        cand = self.x[:, c0:c0 + status.shape[1]] == run.mask_id
        if logits.dtype == torch.float64 and 0 < self.temperature < 1 and bool(cand.any()):
            try:  # select_tokens' check of a float64 z / T that overflows, worded as the eager loop words it
                check_finite_above("logits", logits[cand], self.temperature)
            except InputError as e:
                raise InputError(sel._VALUE_MESSAGES.get(str(e), str(e))) from None
        worst = int(status.max()) if status.numel() else 0
        if worst:
            raise InputError(_STATUS_MESSAGES[worst])
        return entry["outs"]

    def _play(self, entry: dict) -> None:
        """Replay ``entry``'s graph, timed and counted as the eager step's one network call."""
        run = self.run
        cuda = self.x.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.x.device)
        t0 = time.perf_counter()
        calls, rows = run.lm.calls, run.lm.rows
        if cuda:
            with torch.cuda.device(self.x.device):
                entry["replay"]()
            torch.cuda.synchronize(self.x.device)
        else:
            entry["replay"]()
        run.lm.calls, run.lm.rows = calls + 1, rows + self.call_rows  # one network call, as the eager step makes
        run.lm.seconds += time.perf_counter() - t0
        self.replays += 1

    def _entry(self, key: tuple, make: Callable[[], dict]) -> dict:
        entry = self.entries.get(key)
        if entry is None:
            while len(self.entries) >= MAX_GRAPHS:
                self.entries.popitem(last=False)  # its graphs and static tensors go with the last reference
            entry = self.entries[key] = make()
        self.entries.move_to_end(key)
        return entry

    def full(self, lo: int, e: int, t: float | int, k: torch.Tensor | None, fill: bool) -> torch.Tensor:
        """A step over the whole sequence, the logits kept on ``[lo, e)`` (``fill``: ``kv_forward``, the
        block's first step with a cache): the decided positions ``(B, e - lo)``."""
        run = self.run
        V = run.mask_id + 1
        key = ("fill" if fill else "full", run.B, run.L, lo, e, self._weights())
        holder: dict = {}

        def make() -> dict:
            uniform = self._uniform(e - lo)

            def body() -> tuple[torch.Tensor, ...]:
                if fill:
                    logits, holder["cache"] = run.lm.kv_forward(self.x, self.t, run.am, run.pos, V, keep=(lo, e))
                elif self.cfg:  # the eager loop's own guidance (_loops._guided) on the static inputs
                    logits = _guided(run, self.t, (lo, e), self.x, self.am2, self.pos2)
                else:
                    logits = run.lm(self.x, self.t, run.am, run.pos, V, keep=(lo, e))
                return self._select(logits, lo, uniform)

            self._fill_static(t, k, lo, uniform)
            entry = self._build(key, body)
            entry["uniform"], entry["holder"] = uniform, holder
            return entry

        entry = self._entry(key, make)
        self._prepare(t, k, lo, entry)
        chosen = self._replay(entry, lo)
        if fill:
            self._fill_entry = entry
        return chosen

    def window(self, s: int, end: int, e: int, t: float | int, k: torch.Tensor | None) -> torch.Tensor:
        """A later step of a cached block: ``kv_window`` over ``[s, end)`` reading the cache of the block's
        first-step graph, the logits of ``[s, e)``: the decided positions ``(B, e - s)``."""
        run = self.run
        V = run.mask_id + 1
        fill = self._fill_entry
        if fill is None or fill["key"] not in self.entries or fill["key"][4] != e:
            raise RuntimeError("cuda_graph: a cached window step without its block's first-step graph")
        self.entries.move_to_end(fill["key"])
        holder = fill["holder"]
        key = ("window", s, end, e, self._weights())
        entry = fill["windows"].get(key)
        if entry is None:
            uniform = self._uniform(e - s)

            def body() -> tuple[torch.Tensor, ...]:
                logits = run.lm.kv_window(self.x, s, end, self.t, holder["cache"], run.am, run.pos, V, keep_to=e)
                return self._select(logits[:, :e - s], s, uniform)

            self._fill_static(t, k, s, uniform)
            entry = self._build(key, body)
            entry["uniform"] = uniform
            fill["windows"][key] = entry
        self._prepare(t, k, s, entry)
        return self._replay(entry, s)

    def dream(self, lo: int, hi: int, t: int, k: torch.Tensor | None, p: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """A Dream step: the forward with the logits of ``[lo, hi)``, select_tokens' per-row kernel on that
        window, then the eager step's dense results, ``(chosen, confidences, tokens)``, all ``(B, L)``,
        copies (the static outputs are the next replay's).

        * confidence algs (``k``: the step's count): the kernel's selection, then :func:`_dream_dense` (with
          ``alg_temp`` its Gumbel-top-``k`` on the step's uniforms ``(B, L)``);
        * ``alg="origin"`` (``p``: the probability of deciding a masked position this step): the kernel's
          draw of every candidate (sample_categorical's draw, which the kernel reproduces) and the eager
          step's coin ``u < p`` on the step's uniforms ``(B, L)``; no confidences (None)."""
        run = self.run
        V = run.mask_id + 1
        key = ("dream", run.B, run.L, lo, hi, self._weights())

        def make() -> dict:
            # the whole row's uniforms, as the eager step draws them (alg_temp's Gumbel keys, origin's coins)
            uniform = None if not (run.o.alg_temp or self.origin) else torch.zeros(
                run.B, run.L, dtype=torch.float64, device=self.x.device)

            def body() -> tuple[torch.Tensor, ...]:
                logits = run.lm(self.x, self.t, run.am, run.pos, V, keep=(lo, hi))
                tokens, conf, chosen, status, logits = self._select(logits, lo, None)
                cand = self.x == run.mask_id
                if self.origin:
                    x0_d = torch.zeros(run.B, run.L, dtype=torch.int64, device=cand.device)
                    x0_d[:, lo:hi] = tokens
                    return cand & (uniform < self.p), conf, x0_d, status, logits
                full, conf_d, x0_d = _dream_dense(run, cand, lo, hi, tokens, conf, chosen, self.k, uniform)
                return full, conf_d, x0_d, status, logits

            self._fill_static(t, k, lo, uniform)
            entry = self._build(key, body)
            entry["uniform"] = uniform
            return entry

        entry = self._entry(key, make)
        self._prepare(t, k, 0, entry, p)
        full, conf_d, x0_d = self._launch(entry, lo)[:3]
        return full.clone(), None if self.origin else conf_d.clone(), x0_d.clone()

    def bd3lm(self, a: int, b: int, t: int, kv: object | None) -> torch.Tensor:
        """A BD3-LM first-hitting step of block ``[a, b)``: the forward (``kv``: the block through the exact
        KV cache the loop holds for this block; else the model on ``x[:, :b]``), the float32 logits with the
        mask column at ``-inf``, select_tokens' per-row kernel drawing every candidate (sample_categorical's
        draw, which the kernel reproduces; the argmax at temperature 0), then the eager step's pick of one
        candidate per row, the argmax of the step's uniforms ``(B, b - a)`` over the candidates. Writes the
        decided tokens into the run; returns the decided positions ``(B, b - a)`` (a copy). One graph per
        block (its cache differs), replayed for the block's steps."""
        run = self.run
        V = run.mask_id + 1
        W = b - a
        key = ("bd3lm", run.B, run.L, a, b, id(kv), self._weights())

        def make() -> dict:
            uniform = torch.zeros(run.B, W, dtype=torch.float64, device=self.x.device)

            def body() -> tuple[torch.Tensor, ...]:
                if kv is not None:
                    lg = run.lm.block(self.x[:, a:b], a, self.t, kv, V)
                else:
                    lg = run.lm(self.x[:, :b], self.t, None, None, V)[:, a:b]
                lg = lg.float().clone()
                lg[..., run.mask_id] = float("-inf")
                tokens, conf, _, status, lg = self._select(lg, a, None)
                cand = self.x[:, a:b] == run.mask_id
                pick = torch.where(cand, uniform, torch.full_like(uniform, -1.0)).argmax(1)
                chosen = torch.zeros_like(cand).scatter_(1, pick[:, None], cand.any(1, keepdim=True))
                return tokens, conf, chosen, status, lg

            self._fill_static(t, None, a, uniform)
            entry = self._build(key, body)
            entry["uniform"], entry["cache"] = uniform, kv  # the graph reads the cache's tensors: keep them
            return entry

        entry = self._entry(key, make)
        self._prepare(t, None, a, entry)
        tokens, _, chosen = self._launch(entry, a)[:3]
        run.x[:, a:b] = torch.where(chosen, tokens, run.x[:, a:b])
        return chosen.clone()

    def mdlm(self, t: float | int, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An MDLM / DUO ancestral step that calls the network: the forward on the whole sequence, the
        generated region's float32 logits (the mask column at ``-inf``: SUBS; not for DUO) and the CUDA
        posterior kernel reading its counters and the step's ``alpha_bar (3,)`` (``[1, 1 - move_s, 1 -
        move_t]``, the eager step's schedule, ``t = 2``, ``s = 1``) from static buffers. Returns the drawn
        region ``(B, N)`` (a copy) and the static logits ``(B, N, V)`` (valid until the next replay), after
        the eager op's value check."""
        run = self.run
        P, N, B = run.P, run.N, run.B
        absorbing = run.o.preset == "mdlm"
        key = ("mdlm", B, run.L, self._weights())

        def make() -> dict:
            def body() -> tuple[torch.Tensor, ...]:
                logits = run.lm(self.x, self.t, run.am, run.pos, run.mask_id + 1)
                lg = logits[:, P:].float()
                if absorbing:
                    lg = lg.clone()
                    lg[..., run.mask_id] = float("-inf")
                V = lg.shape[-1]
                rows = lg.reshape(-1, V)
                if rows.stride(-1) != 1:
                    rows = rows.contiguous()
                x_t = self.x[:, P:].reshape(-1).contiguous()
                n = x_t.shape[0]
                t1 = torch.full((n,), 2, dtype=torch.int64, device=x_t.device)
                s1 = torch.full((n,), 1, dtype=torch.int64, device=x_t.device)
                plan = PosteriorPlan(KIND_ABSORBING if absorbing else KIND_UNIFORM, logits=rows, x_t=x_t, t=t1,
                                     s=s1, vocab_size=V, temperature=self.temperature,
                                     mask_id=run.mask_id if absorbing else -1,
                                     a_t=self.alpha_bar.index_select(0, t1), a_s=self.alpha_bar.index_select(0, s1))
                return self.posterior_op(plan, self.counters), lg

            self.x.copy_(run.x)  # the capture's values: this step's, offset 0
            self.t.fill_(int(t) if run.lm.fastdiff else float(t))
            self.alpha_bar.copy_(alpha_bar)
            self.counters.copy_(torch.tensor([int64_bits(run.seed), 0, 0], dtype=torch.int64))
            return self._build(key, body)

        entry = self._entry(key, make)
        self._prepare_mdlm(t, alpha_bar)
        self._play(entry)
        tokens, lg = entry["outs"][:2]
        region = self.x[:, P:]
        check_finite_above("x0_logits", lg, self.temperature, mask_id=run.mask_id if absorbing else None,
                           x_t=region)  # the eager op's check (and error), before the tokens are used
        return tokens.reshape(B, N).clone(), lg

    def _prepare_mdlm(self, t: float | int, alpha_bar: torch.Tensor) -> None:
        """An MDLM / DUO step's values into the static inputs: sequence, time, schedule, counters (the eager
        op's one offset, row offset 0)."""
        run = self.run
        self.x.copy_(run.x)
        self.t.fill_(int(t) if run.lm.fastdiff else float(t))
        self.alpha_bar.copy_(alpha_bar)
        self.counters.copy_(torch.tensor([int64_bits(run.seed), int64_bits(run.next_offset()), 0],
                                         dtype=torch.int64))

    def _fill_static(self, t: float | int, k: torch.Tensor | None, c0: int, uniform: torch.Tensor | None) -> None:
        """The capture's input values: this step's (its draws use offset 0 and do not advance the run's
        counter; the replay that follows recomputes everything with the step's own counters)."""
        run = self.run
        self.x.copy_(run.x)
        self.t.fill_(int(t) if run.lm.fastdiff else float(t))
        if k is not None:
            self.k.copy_(k)
        self.seed_offset.copy_(torch.tensor([int64_bits(run.seed), 0], dtype=torch.int64))
        if uniform is not None:
            uniform.fill_(0.5)
