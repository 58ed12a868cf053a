"""A group of window steps that goes through the decoder as one pass, layer by layer.

At layer ``l`` a window reads only keys/values that layer ``l`` makes from its own input (the memory's sink,
beacons and raw cache as layer ``l`` produced them, and the window's own entries): nothing it needs at layer
``l`` depends on layer ``l``'s *output* for an earlier window. So the consecutive steps of a call can be
concatenated along the sequence and run through every decoder layer together: embeddings, norms, projections,
RoPE and MLP see one long sequence (big matrix products), and only inside each attention layer do the steps'
attentions and memory updates run in window order (`layer.BeaconAttention`). The result equals the step-by-step
loop up to floating-point summation order (docs/semantics.md).

Inside the attention a group is cut into *segments*, each either one step (any mode: the step's own mask and
`memory.MemoryUpdate`) or a *run* of consecutive steps that only append their window to the compressed memory
(`schedule.StepHost.appends`: plain steps that start and end with an empty raw cache, the common case of
``stride == window``). A run is one batch of windows: every window attends causally to itself and, through one
masked call, to the memory before the run plus the compressed entries of the run's earlier windows.

Everything here is planned on the host (numpy) and becomes a handful of device tensors per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch

from .schedule import StepPlan, to_device


@dataclass(frozen=True)
class Run:
    """A run of ``G`` appending steps (windows), as index tensors into the group's concatenation. Shapes: G windows,
    W the longest window's entries, n the run's entries, K the compressed entries the run appends."""

    start: int  # the run's first entry in the group's concatenation
    length: int  # n
    windows: int  # G
    width: int  # W
    # (G * W,) entry of the run (0..n-1) at each window slot (padding repeats one) and (n,) window slot of each
    # entry in run order; both None when no window is padded (the run is then G windows of W entries back to back)
    window_index: Optional[torch.Tensor]
    unpad: Optional[torch.Tensor]
    appended: torch.Tensor  # (K,) entries of the run entering the compressed memory, in order
    appended_positions: np.ndarray  # (B, K) their positions: each row's from its own compressed length on
    # (B, G) memory entries window i of row b reads: the row's memory before the run + earlier windows' appends
    # (a prefix of the row's memory after the run)
    visible: np.ndarray
    # rows whose compressed memories differ in length (after a ragged batch): (B, C + K) gather index of each row's
    # compressed memory after the run out of cat(compressed before, appended), padding as the window loop pads;
    # None when every row has the same length (the memory after the run is then that concatenation)
    comp_index: Optional[torch.Tensor] = None

    @property
    def shared(self) -> bool:
        """Every row reads the same memory prefixes (its rows' compressed memories are equally long)."""
        return self.comp_index is None


@dataclass(frozen=True)
class Segment:
    """One step of the group, or a run of appending steps (``run``) from step ``step`` on; ``start``/``length``
    in the group's concatenation."""

    start: int
    length: int
    step: int  # the (first) step's index in the group
    run: Optional[Run] = None


class GroupPlan:
    """The steps of one decoder pass and the group-wide tensors built from their host arrays.

    Shapes: B rows, T = sum of the steps' lengths (the concatenation), N input columns. ``min_run``: the fewest
    appending steps that run as one batch of windows (None: none do, every step runs on its own)."""

    def __init__(self, plans: list[StepPlan], device, min_run: Optional[int] = 2):
        self.plans = plans
        self.device = device
        hosts = [p.host for p in plans]
        lengths = [h.length for h in hosts]
        self.offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        T = int(self.offsets[-1])
        self.length = T
        is_beacon = np.concatenate([h.is_beacon for h in hosts], axis=1)  # (B, T)
        self.has_beacons = bool(is_beacon.any())
        B = is_beacon.shape[0]
        out_src = []
        for h, off, L in zip(hosts, self.offsets, lengths):  # step-flat (B * L) -> group-flat (B * T)
            out_src.append(h.out_src // L * T + off + h.out_src % L)
        t = partial(to_device, device=device)
        self.input_cols = t(np.concatenate([h.input_cols for h in hosts], axis=1))  # (B, T)
        self.is_beacon = t(is_beacon)  # (B, T)
        self.position_ids = t(np.concatenate([h.position_ids for h in hosts], axis=1))  # (B, T)
        self.beacon_flat = t(np.flatnonzero(is_beacon.reshape(-1))) if self.has_beacons else None  # (n_beacons,)
        self.out_src = t(np.concatenate(out_src))  # (n_raw,) into (B * T)
        self.out_dst = t(np.concatenate([h.out_dst for h in hosts]))  # (n_raw,) into (B * N)
        self.segments = self._segments(hosts, min_run)
        self.rope_positions, self.rope_slices = self._rope_positions(hosts, B)

    # --- segments ---------------------------------------------------------------------------------------------
    def _segments(self, hosts, min_run: Optional[int]) -> list[Segment]:
        segments, i = [], 0
        min_run = min_run or len(hosts) + 1
        while i < len(hosts):
            j = i
            while j < len(hosts) and hosts[j].appends is not None and self._continues(hosts, i, j):
                j += 1
            if j - i >= min_run:
                segments.append(self._run(hosts, i, j))
                i = j
            else:
                segments.append(Segment(int(self.offsets[i]), hosts[i].length, step=i))
                i += 1
        return segments

    @staticmethod
    def _continues(hosts, i: int, j: int) -> bool:
        """Step j can join the run that starts at step i: its memory is what step i's held plus the run's appends."""
        if j == i:
            return True
        S0, C0, _ = hosts[i].widths
        S, C, _ = hosts[j].widths
        return S == S0 and C == C0 + sum(len(h.appends) for h in hosts[i:j])

    def _run(self, hosts, i: int, j: int) -> Segment:
        steps = hosts[i:j]
        lengths = [h.length for h in steps]
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        G, W, n = len(steps), max(lengths), int(sum(lengths))
        padded = any(L != W for L in lengths)
        slots = np.minimum(np.arange(W)[None, :], np.array(lengths)[:, None] - 1) + starts[:, None]  # (G, W)
        unpad = np.concatenate([g * W + np.arange(L) for g, L in enumerate(lengths)])
        appended = np.concatenate([s + h.appends for s, h in zip(starts, steps)])
        counts = np.array([len(h.appends) for h in steps])
        S, C, _ = steps[0].widths
        K = int(counts.sum())
        before = steps[0].lengths[1]  # (B,) each row's compressed entries before the run
        t = partial(to_device, device=self.device)
        run = Run(start=int(self.offsets[i]), length=n, windows=G, width=W,
                  window_index=t(slots.reshape(-1)) if padded else None, unpad=t(unpad) if padded else None,
                  appended=t(appended), appended_positions=S + before[:, None] + np.arange(K)[None, :],
                  visible=S + before[:, None] + np.concatenate(([0], np.cumsum(counts)[:-1]))[None, :],
                  comp_index=None if (before == C).all() else t(self._ragged_comp_index(before, C, K)))
        return Segment(run.start, n, step=i, run=run)

    @staticmethod
    def _ragged_comp_index(before: np.ndarray, C: int, K: int) -> np.ndarray:
        """(B, C + K) index into cat(compressed (C), appended (K)) of each row's compressed memory after a run: its
        ``before[b]`` entries, then the K appended ones, then padding. The padding repeats the row's first entry
        after the run's second-last window, as the window loop's last gather pads (with index 0)."""
        index = np.zeros((len(before), C + K), dtype=np.int64)
        for b, c in enumerate(before.tolist()):
            index[b, :c] = np.arange(c)
            index[b, c : c + K] = C + np.arange(K)
            index[b, c + K :] = 0 if c else C
        return index

    # --- rotary tables the attention needs besides the decoder's own ------------------------------------------
    def _rope_positions(self, hosts, B: int):
        """One (B, P) position array for every RoPE table the layers need beyond the entries' own: per step the
        pre-RoPE memory parts (sink, raw cache) and the entries entering the compressed memory; per run the sink
        and the appended entries. Returns it (or None) and, per segment, the slices of its tables."""
        pieces, slices, at = [], [], 0

        def add(a: Optional[np.ndarray]) -> Optional[slice]:
            nonlocal at
            if a is None or a.shape[1] == 0:
                return None
            pieces.append(a)
            at += a.shape[1]
            return slice(at - a.shape[1], at)

        for seg in self.segments:
            if seg.run is not None:
                S = hosts[seg.step].widths[0]
                slices.append((add(np.broadcast_to(np.arange(S), (B, S))), add(seg.run.appended_positions)))
            else:
                h = hosts[seg.step]
                slices.append((add(h.mem_positions), add(h.comp_positions)))
        if not pieces:
            return None, slices
        return to_device(np.concatenate(pieces, axis=1), self.device), slices


@dataclass
class GroupContext:
    """What every attention layer needs for one group; passed through the decoder as the ``beacon_ctx`` keyword.

    It holds the memory at the group's start (never mutated, so a gradient-checkpointing replay reads the same
    inputs) and collects each layer's memory after the group in ``new_layers``. Masks and tables shared by every
    layer are built on first use and kept here."""

    adapter: str
    config: object  # BeaconConfig
    dtype: torch.dtype  # of the embeddings: the steps' additive masks are made in it
    group: GroupPlan
    layers: list
    rope: list  # per segment: (memory tables, compressed tables), each (cos, sin) (B, *, D) or None
    new_layers: list
    _cache: dict = field(default_factory=dict)

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


class SealedContext:
    """The group's `group.GroupContext`, sealed while it crosses the decoder layers' module boundaries.

    A decoder layer writes its next memory into the context it is given (``ctx.new_layers[i]``). Wrappers around a
    decoder layer that rebuild the containers of its inputs holding tensors that require grad would hand the layer
    a copy instead: FSDP2's pre-forward (torch 2.13, ``fully_shard`` per decoder layer) passes every such input
    through its post-backward autograd function and rebuilds dataclasses and lists around them with
    ``dataclasses.replace``, so from layer 1 on (``new_layers`` then holds layer 0's memory) a layer's memory went
    into a copy and the step failed with "decoder layers [1] bypassed the beacon attention". Sealed, the context is
    an opaque object to such traversals; the beacon attention opens it (`open_context`) before its forward.
    """

    __slots__ = ("ctx",)

    def __init__(self, ctx):
        self.ctx = ctx


class Sealing:
    """``original`` (the decoder's forward) with its ``beacon_ctx`` keyword sealed; `model._decoder_forward` wraps the
    decoder's forward in one for each call."""

    __slots__ = ("original",)

    def __init__(self, original):
        self.original = original

    def __call__(self, *args, **kwargs):
        if kwargs.get("beacon_ctx") is not None:
            kwargs["beacon_ctx"] = SealedContext(kwargs["beacon_ctx"])
        return self.original(*args, **kwargs)


def open_context(module, args, kwargs):
    """Forward pre-hook of a `BeaconAttention`: hand it the `GroupContext` itself."""
    if isinstance(kwargs.get("beacon_ctx"), SealedContext):
        kwargs["beacon_ctx"] = kwargs["beacon_ctx"].ctx
        return args, kwargs
    return None
