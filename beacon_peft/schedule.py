"""Pure bookkeeping of progressive compression: which tokens form the next chunk, where beacons go, which
positions everything gets, and what the memory keeps afterwards. No `nn.Module` here.

A *chunk* is the not-yet-processed raw tokens of a row's open window that this call supplies, so one forward
pass never crosses a window boundary. Every row of a batch is scheduled over its own tokens (left or right
padding is skipped), and the rows of a step are padded to a common length. A step's plan is built once and
shared by every layer; it is split by who reads it:

* `StepInputs`, read by the window loop (`forward.py`): what to embed, at which positions, where outputs go;
* `StepMask`, read by `masks.build_mask` and the attention: the widths, lengths and window indices of the keys;
* `memory.MemoryUpdate`, applied by every layer: what the memory keeps afterwards.

The bookkeeping runs on the host, in Python and numpy: planning a step dispatches no tensor op (on a GPU no
kernel launch), and a step's tensors are made only when something reads them (`StepPlan.inputs`, `.mask`,
`.update`); a group of steps that runs as one decoder pass (`group.GroupPlan`) reads the host arrays
(`StepPlan.host`) directly.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import numpy as np
import torch

from .config import BeaconConfig
from .memory import MemoryState, MemoryUpdate, RowState, Take


def _pad_lists(lists: list[list[int]]) -> np.ndarray:
    """Right-padded (B, T) int64 array of per-row index lists (padding 0)."""
    width = max((len(x) for x in lists), default=0)
    out = np.zeros((len(lists), width), dtype=np.int64)
    for b, x in enumerate(lists):
        if x:
            out[b, : len(x)] = x
    return out


def to_device(a: np.ndarray, device) -> torch.Tensor:
    """A host array as a tensor on ``device`` (on the CPU the array's memory itself, made contiguous first)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)


def host_array(t: torch.Tensor) -> np.ndarray:
    """A (CPU or device) tensor's values as a numpy array (no copy for a CPU tensor)."""
    return (t if t.device.type == "cpu" else t.cpu()).numpy()


@dataclass
class RowChunk:
    """The chunk of one row: ``n`` raw tokens followed/interleaved by ``beacons`` beacons."""

    n: int = 0
    beacons: int = 0
    ratio: int = 0
    complete: bool = False  # the chunk completes its window: beacons move to the compressed memory
    bare: bool = False  # interleave: raw tokens read without the beacons between them (a training call's last)
    raw_entries: Optional[np.ndarray] = None  # (n,) entry index of each raw token within the chunk
    beacon_entries: Optional[np.ndarray] = None  # (beacons,) entry index of each beacon
    beacon_local: Optional[np.ndarray] = None  # (beacons,) window-local beacon index j
    beacon_positions: Optional[np.ndarray] = None  # (beacons,) explicit positions (append + scoped), else None

    @property
    def length(self) -> int:
        return self.n + self.beacons


@dataclass
class RowUpdate:
    """What one row's memory keeps after a step, as index lists (the batch's are padded into a `MemoryUpdate`)."""

    sink: list[int]  # entries of cat(sink, chunk) kept as the sink
    raw: list[int]  # entries of cat(raw cache, chunk) kept as the raw cache
    comp_new: list[int]  # entries of cat(raw cache, chunk) entering the compressed memory
    comp_new_positions: list[int]  # the positions they are rotated to
    comp: list[int]  # entries of cat(compressed, new) kept as the compressed memory
    raw_is_beacon: list[bool]  # raw-cache metadata after the step
    raw_local: list[int]
    sink_changed: bool = False


@dataclass(frozen=True)
class StepInputs:
    """What the window loop embeds and runs for one step. Shapes: B rows, L chunk entries, N input columns."""

    input_cols: torch.Tensor  # (B, L) input column of raw entries (0 elsewhere)
    is_beacon: torch.Tensor  # (B, L) bool
    valid: torch.Tensor  # (B, L) bool: a real entry (not padding)
    position_ids: torch.Tensor  # (B, L)
    mem_positions: torch.Tensor  # (B, S + R) positions of the pre-RoPE memory parts (sink, raw cache)
    comp_positions: Optional[torch.Tensor]  # (B, K) positions of entries entering the compressed memory
    out_dst: torch.Tensor  # (n_raw,) flat index into (B * N) of each raw entry's input column
    out_src: torch.Tensor  # (n_raw,) flat index into (B * L) of that raw entry
    beacon_flat: Optional[torch.Tensor]  # (n_beacons,) flat index into (B * L) of beacon entries; None: no beacon

    @property
    def has_beacons(self) -> bool:
        return self.beacon_flat is not None


@dataclass(frozen=True)
class StepMask:
    """What the attention mask of a step is built from (`masks.build_mask`). Shapes: B rows, L chunk entries."""

    valid: torch.Tensor  # (B, L) bool
    is_beacon: torch.Tensor  # (B, L) bool
    local: torch.Tensor  # (B, L) window-local index of each entry (raw token i or beacon j)
    ratio: torch.Tensor  # (B,) ratio of each row's window (0: none)
    sink_len: torch.Tensor  # (B,) memory part lengths before the step
    comp_len: torch.Tensor
    raw_len: torch.Tensor
    widths: tuple[int, int, int]  # padded widths (S, C, R) of the memory parts before the step
    mem_raw_is_beacon: torch.Tensor  # (B, R) raw-cache metadata before the step
    mem_raw_local: torch.Tensor
    scoped: bool  # beacons in this step see only part of their window (step-expansion / segmentation)
    plain: bool  # no padding anywhere and not scoped: the mask is plain bottom-right causal


@dataclass(frozen=True)
class StepHost:
    """One step on the host (numpy): everything `StepInputs`, `StepMask` and `MemoryUpdate` are made from.
    Shapes: B rows, L chunk entries, (S, C, R) the memory parts' padded widths before the step."""

    input_cols: np.ndarray  # (B, L) int64
    is_beacon: np.ndarray  # (B, L) bool
    valid: np.ndarray  # (B, L) bool
    position_ids: np.ndarray  # (B, L) int64
    local: np.ndarray  # (B, L) int64 window-local index
    mem_positions: np.ndarray  # (B, S + R) int64
    comp_positions: Optional[np.ndarray]  # (B, K) int64; None: no window completes
    out_dst: np.ndarray  # (n_raw,) flat index into (B * N)
    out_src: np.ndarray  # (n_raw,) flat index into (B * L)
    ratio: np.ndarray  # (B,) int64
    lengths: np.ndarray  # (3, B) int64: sink, compressed and raw-cache lengths before the step
    widths: tuple[int, int, int]
    mem_raw_is_beacon: np.ndarray  # (B, R) bool
    mem_raw_local: np.ndarray  # (B, R) int64
    scoped: bool
    plain: bool
    tokens: int  # the most raw tokens a row reads in this step
    sink: object  # `Take` or (B, T) int64 gather index (see `MemoryUpdate`)
    raw: object
    comp_new: Optional[np.ndarray]  # (B, K) int64
    comp: object
    # a step whose rows are alike (same chunk length and sink, no padding, not scoped) that starts and ends with an
    # empty raw cache, keeps the sink and appends its window to the compressed memory (each row's, whatever its
    # length): the entries (K,) of its chunk that enter the compressed memory. Such steps in a row run as one batch
    # of windows inside each layer (`layer.BeaconAttention`); else None.
    appends: Optional[np.ndarray] = None

    @property
    def length(self) -> int:
        return self.valid.shape[1]


class StepPlan:
    """One forward step: its inputs (window loop), its mask (attention) and its memory update (every layer).

    Built on the host (`host`); the tensors of each part are made on ``device`` on first use."""

    def __init__(self, host: StepHost, device):
        self.host = host
        self.device = device

    @cached_property
    def inputs(self) -> StepInputs:
        h, dev = self.host, self.device
        beacon_flat = np.flatnonzero(h.is_beacon.reshape(-1)) if h.is_beacon.any() else None
        return StepInputs(
            input_cols=to_device(h.input_cols, dev),
            is_beacon=to_device(h.is_beacon, dev),
            valid=to_device(h.valid, dev),
            position_ids=to_device(h.position_ids, dev),
            mem_positions=to_device(h.mem_positions, dev),
            comp_positions=None if h.comp_positions is None else to_device(h.comp_positions, dev),
            out_dst=to_device(h.out_dst, dev),
            out_src=to_device(h.out_src, dev),
            beacon_flat=None if beacon_flat is None else to_device(beacon_flat, dev),
        )

    @cached_property
    def mask(self) -> StepMask:
        h, dev = self.host, self.device
        inputs = self.inputs
        return StepMask(
            valid=inputs.valid,
            is_beacon=inputs.is_beacon,
            local=to_device(h.local, dev),
            ratio=to_device(h.ratio, dev),
            sink_len=to_device(h.lengths[0], dev),
            comp_len=to_device(h.lengths[1], dev),
            raw_len=to_device(h.lengths[2], dev),
            widths=h.widths,
            mem_raw_is_beacon=to_device(h.mem_raw_is_beacon, dev),
            mem_raw_local=to_device(h.mem_raw_local, dev),
            scoped=h.scoped,
            plain=h.plain,
        )

    @cached_property
    def update(self) -> MemoryUpdate:
        h, dev = self.host, self.device

        def sel(how):
            return how if isinstance(how, Take) else to_device(how, dev)

        return MemoryUpdate(sink=sel(h.sink), raw=sel(h.raw),
                            comp_new=None if h.comp_new is None else to_device(h.comp_new, dev), comp=sel(h.comp))


class RatioPicker:
    """Chooses compression ratios the way ``ratio_mix`` says (see `BeaconConfig`)."""

    def __init__(self, config: BeaconConfig, max_positions: Optional[int]):
        self.config = config
        self.max_positions = max_positions
        self.rng = random.Random(config.ratio_seed) if config.ratio_seed is not None else random
        self.override: Optional[int] = None
        self.warned_random_inference = False  # `warn_random_inference` speaks once per adapter

    def draws_at_random(self) -> bool:
        """Whether calls draw their ratios at random: no forced ratio, several ratios, a random ``ratio_mix``."""
        cfg = self.config
        return self.override is None and len(set(cfg.ratios)) > 1 and cfg.ratio_mix in ("step-random",
                                                                                          "instance-random")

    def warn_random_inference(self) -> None:
        """An inference call (eval mode) that draws its ratios at random gives different outputs for the same input
        (the official semantics; training wants it): say so once, with the way to force one ratio."""
        if self.warned_random_inference or not self.draws_at_random():
            return
        self.warned_random_inference = True
        warnings.warn(f"beacon_peft: ratio_mix={self.config.ratio_mix!r} draws a compression ratio from "
                      f"{sorted(set(self.config.ratios))} at random in inference too (the official semantics), so "
                      "two calls on the same input can differ; for reproducible outputs force one with "
                      "model.base_model.set_compression_ratio(r) (or `with model.base_model.compression_ratio(r):`)",
                      UserWarning, stacklevel=2)

    def _adapt(self, sequence_length: int) -> int:
        cfg = self.config
        if self.max_positions is None:
            return max(cfg.ratios)
        fits = []
        for r in cfg.ratios:
            capacity = self.max_positions if r == 0 else (self.max_positions - cfg.window) * r + cfg.window
            if capacity >= sequence_length:
                fits.append((capacity, r))
        return min(fits)[1] if fits else max(cfg.ratios)

    def pick(self, state: MemoryState, sequence_length: int) -> int:
        cfg = self.config
        if self.override is not None:
            return self.override
        if len(set(cfg.ratios)) == 1:
            return cfg.ratios[0]
        if cfg.ratio_mix == "step-random":
            return self.rng.choice(cfg.ratios)
        if state.sequence_ratio is None:
            if cfg.ratio_mix == "instance-random":
                state.sequence_ratio = self.rng.choice(cfg.ratios)
            else:
                state.sequence_ratio = self._adapt(sequence_length + cfg.adapt_future_tokens)
        return state.sequence_ratio


def check_continuable_calls(config: BeaconConfig, training: bool, what: str) -> None:
    """Refuse up front ``what`` (a caller that continues its own memory call after call: `reuse.read`,
    ``generate()``) in training mode with interleaved beacons: the first call's last window would keep no beacons
    and the next call could not continue it (`Scheduler._check_continuable`)."""
    if training and config.interleaved:
        raise ValueError(f"{what} in training mode: a training-mode call gives its last window no beacons (the "
                         f"official semantics), so with placement='interleave' its memory cannot be continued by "
                         f"the next call; call model.eval() first")


class Scheduler:
    """Plans the chunks of one forward call over ``cols[b]`` (the input columns of row b's real tokens)."""

    def __init__(self, config: BeaconConfig, state: MemoryState, cols: list, n_columns: int,
                 training: bool, picker: RatioPicker, device):
        self.cfg = config
        self.state = state
        self.cols = [host_array(c) if isinstance(c, torch.Tensor) else np.asarray(c, dtype=np.int64) for c in cols]
        self.ptr = [0] * len(cols)
        self.n_columns = n_columns
        self.training = training
        self.picker = picker
        self.device = device
        longest = max((len(c) for c in cols), default=0)
        self.sequence_length = max(r.tokens for r in state.rows) + longest
        self._check_continuable()

    def _check_continuable(self) -> None:
        """Refuse, before any work, to continue a row whose open window holds raw tokens read in training mode
        without their interleaved beacons: those beacons belong between tokens already read and cannot be made
        afterwards (with ``placement="append"`` they come after the window, so such a window is simply finished)."""
        for b, (row, cols) in enumerate(zip(self.state.rows, self.cols)):
            if row.bare and len(cols):
                raise ValueError(
                    f"cannot continue this memory: row {b}'s open window holds {row.bare} raw tokens read in "
                    f"training mode without their beacons (the official semantics give a training call's last "
                    f"window none), and with placement='interleave' the beacons between them cannot be made "
                    f"afterwards; make a memory to be continued in eval mode (model.eval()), or read the whole "
                    f"input in one call")

    def done(self) -> bool:
        return all(p >= len(c) for p, c in zip(self.ptr, self.cols))

    def plan(self) -> Optional[StepPlan]:
        """The next step's plan (and the bookkeeping advanced past it), or None when every row is consumed."""
        if self.done():
            return None
        st = self.state
        drawn: list[int] = []

        def ratio_for_step() -> int:  # one draw per step, shared by the rows that start a window in it
            if not drawn:
                drawn.append(self.picker.pick(st, self.sequence_length))
                st.ratio_log.append(drawn[0])
            return drawn[0]

        chunks = [self._row_chunk(b, ratio_for_step) for b in range(len(st.rows))]
        if not any(c.length for c in chunks):  # every step must read a token or complete a window
            stuck = [(b, r.win_raw) for b, r in enumerate(st.rows) if self.ptr[b] < len(self.cols[b])]
            raise ValueError(f"the beacon schedule makes no progress: rows (row, raw tokens in the open window) "
                             f"{stuck} have tokens left but their open window of {self.cfg.window} can take "
                             f"neither a token nor its beacons (a memory whose last window was read in training "
                             f"mode, saved by an older beacon_peft?); continue a memory made in eval mode")
        st.step_log.append([(c.length, r.sink + r.comp + r.raw, c.beacons) for c, r in zip(chunks, st.rows)])
        widths = (max(r.sink for r in st.rows), max(r.comp for r in st.rows), max(r.raw for r in st.rows))
        mem_kinds_a, mem_locs_a = st.raw_is_beacon, st.raw_local
        inputs = self._inputs(chunks, widths)
        mem_kinds, mem_locs = mem_kinds_a.tolist(), mem_locs_a.tolist()
        chunk_kinds, chunk_locs = inputs["is_beacon"].tolist(), inputs["local"].tolist()
        updates = [
            self._row_update(row, ch, mem_kinds[b][: row.raw] + chunk_kinds[b][: ch.length],
                             mem_locs[b][: row.raw] + chunk_locs[b][: ch.length], widths)
            for b, (row, ch) in enumerate(zip(st.rows, chunks))
        ]
        update = self._update(chunks, updates, widths)
        lengths = np.array([[r.sink for r in st.rows], [r.comp for r in st.rows], [r.raw for r in st.rows]],
                           dtype=np.int64)
        scoped = self.cfg.scoped and bool(inputs["is_beacon"].any())
        L = inputs["valid"].shape[1]
        # rows alike but for how much each has compressed (after a ragged batch, for good): may still append
        alike = (not scoped and all(c.length == L for c in chunks)
                 and all((r.sink, r.raw) == (widths[0], widths[2]) for r in st.rows))
        plain = alike and all(r.comp == widths[1] for r in st.rows)
        host = StepHost(**inputs, tokens=max(c.n for c in chunks),
                        ratio=np.array([c.ratio for c in chunks], dtype=np.int64), lengths=lengths,
                        widths=widths, mem_raw_is_beacon=mem_kinds_a, mem_raw_local=mem_locs_a, scoped=scoped,
                        plain=plain, **update)
        host = self._with_appends(host, updates, alike)
        self._advance(chunks, updates)
        st.raw_is_beacon = _pad_lists([[int(x) for x in u.raw_is_beacon] for u in updates]).astype(bool)
        st.raw_local = _pad_lists([u.raw_local for u in updates])
        return StepPlan(host, self.device)

    @staticmethod
    def _with_appends(host: StepHost, updates: list[RowUpdate], alike: bool) -> StepHost:
        """Mark a step that only appends its window to the compressed memory (see `StepHost.appends`): rows alike
        (``alike``: same chunk length, sink and empty raw cache, no scoped beacons), each row's compressed memory
        followed by the same entries of its chunk. The rows' compressed lengths may differ (``comp`` then gathers
        per row), as they do for good after a batch of ragged rows."""
        S, C, R = host.widths
        comp_ok = host.comp is Take.CAT or isinstance(host.comp, np.ndarray)
        if not (alike and R == 0 and host.comp_new is not None and host.sink is Take.KEEP
                and host.raw is Take.EMPTY and comp_ok):
            return host
        first = updates[0].comp_new
        if any(u.comp_new != first for u in updates[1:]):
            return host
        return StepHost(**{**host.__dict__, "appends": np.asarray(first, dtype=np.int64)})

    # --- one row ------------------------------------------------------------------------------------------
    def _row_chunk(self, b: int, ratio_for_step: Callable[[], int]) -> RowChunk:
        """Row b's chunk: its raw tokens up to the window's end and where its beacons go."""
        cfg, row = self.cfg, self.state.rows[b]
        avail = len(self.cols[b]) - self.ptr[b]
        if avail <= 0:
            return RowChunk()
        n = min(cfg.window - row.win_raw, avail)
        no_beacons = self.training and n == avail  # official: the final window of a training call gets none
        complete = row.win_raw + n == cfg.window and not no_beacons
        wants_beacons = not no_beacons and (cfg.interleaved or complete)
        if wants_beacons and row.ratio is None:
            row.ratio = ratio_for_step()
        r = row.ratio if wants_beacons else 0
        chunk = RowChunk(n=n, ratio=r or 0, complete=complete, bare=no_beacons and cfg.interleaved)
        i = np.arange(n)
        if not r:
            chunk.raw_entries = i
            return chunk
        if cfg.interleaved:
            nb = (row.rem + n) // r
            chunk.raw_entries = i + (row.rem + i) // r
            j = np.arange(nb)
            chunk.beacon_entries = (j + 1) * r - row.rem - 1 + j + 1
            chunk.beacon_local = j + (row.win_raw - row.rem) // r
        else:
            nb = cfg.stride // r
            chunk.raw_entries = i
            chunk.beacon_entries = n + np.arange(nb)
            chunk.beacon_local = np.arange(nb)
            if cfg.scoped:
                start = row.sink + row.comp  # position of the window's first raw token
                step = r + 1 if cfg.attend_prev else r
                chunk.beacon_positions = start + (chunk.beacon_local + 1) * step - (1 if cfg.attend_prev else 0)
        chunk.beacons = nb
        return chunk

    def _row_update(self, row: RowState, ch: RowChunk, kinds: list[bool], locs: list[int],
                    widths: tuple[int, int, int]) -> RowUpdate:
        """What row's memory keeps after its chunk. ``kinds``/``locs``: is-beacon flag and window-local index of
        every entry of cat(raw cache, chunk), in window order."""
        cfg = self.cfg
        S, C, R = widths
        if cfg.sink_size and ch.length and row.comp == 0:
            # while nothing is compressed yet, the sink is the first entries of every chunk (official semantics)
            sink_len, sink_changed = min(cfg.sink_size, ch.length), True
            sink = list(range(S, S + sink_len))
        else:
            sink_len, sink, sink_changed = row.sink, list(range(row.sink)), False
        entries = list(range(row.raw)) + [R + e for e in range(ch.length)]  # into cat(raw cache, chunk)
        if not ch.complete:
            return RowUpdate(sink=sink, raw=entries, comp_new=[], comp_new_positions=[], comp=list(range(row.comp)),
                             raw_is_beacon=kinds, raw_local=locs, sink_changed=sink_changed)
        raw_ids = [k for k, beacon in enumerate(kinds) if not beacon]
        overlap = raw_ids[cfg.stride :]  # the first `stride` raw tokens leave the window, the rest stay
        # the window's beacons enter the compressed memory; with compression off, its leaving raw tokens do
        moved = [k for k, beacon in enumerate(kinds) if beacon] if ch.ratio else raw_ids[: cfg.stride]
        start = sink_len + row.comp
        return RowUpdate(
            sink=sink,
            raw=[entries[k] for k in overlap],
            comp_new=[entries[k] for k in moved],
            comp_new_positions=list(range(start, start + len(moved))),
            comp=list(range(row.comp)) + [C + k for k in range(len(moved))],
            raw_is_beacon=[False] * len(overlap),
            raw_local=[locs[k] - cfg.stride for k in overlap],
            sink_changed=sink_changed,
        )

    # --- the batch ----------------------------------------------------------------------------------------
    def _inputs(self, chunks: list[RowChunk], widths: tuple[int, int, int]) -> dict:
        """The step's input arrays (`StepHost` fields, on the host)."""
        st = self.state
        B, L = len(chunks), max(c.length for c in chunks)
        S, _, R = widths
        input_cols = np.zeros((B, L), dtype=np.int64)
        is_beacon = np.zeros((B, L), dtype=bool)
        valid = np.zeros((B, L), dtype=bool)
        position_ids = np.zeros((B, L), dtype=np.int64)
        local = np.zeros((B, L), dtype=np.int64)
        out_dst, out_src = [], []
        for b, (row, ch) in enumerate(zip(st.rows, chunks)):
            valid[b, : ch.length] = True
            position_ids[b, : ch.length] = row.sink + row.comp + row.raw + np.arange(ch.length)
            if ch.n:
                cols = self.cols[b][self.ptr[b] : self.ptr[b] + ch.n]
                input_cols[b, ch.raw_entries] = cols
                local[b, ch.raw_entries] = row.win_raw + np.arange(ch.n)
                out_dst.append(b * self.n_columns + cols)
                out_src.append(b * L + ch.raw_entries)
            if ch.beacons:
                is_beacon[b, ch.beacon_entries] = True
                local[b, ch.beacon_entries] = ch.beacon_local
                if ch.beacon_positions is not None:
                    position_ids[b, ch.beacon_entries] = ch.beacon_positions
        mem_positions = np.concatenate(
            (np.broadcast_to(np.arange(S), (B, S)),
             np.array([[r.sink + r.comp] for r in st.rows], dtype=np.int64) + np.arange(R)), axis=1)  # (B, S + R)
        empty = np.zeros(0, dtype=np.int64)
        return dict(input_cols=input_cols, is_beacon=is_beacon, valid=valid, position_ids=position_ids, local=local,
                    mem_positions=mem_positions.astype(np.int64),
                    out_dst=np.concatenate(out_dst).astype(np.int64) if out_dst else empty,
                    out_src=np.concatenate(out_src).astype(np.int64) if out_src else empty)

    def _update(self, chunks: list[RowChunk], updates: list[RowUpdate], widths: tuple[int, int, int]) -> dict:
        """Pad the rows' index lists into the `MemoryUpdate` fields (with shortcuts when every row does the same),
        and the positions (B, K) the new compressed entries are rotated to (None when no window completes)."""
        S, C, R = widths
        L = max(c.length for c in chunks)
        sink_changed = any(u.sink_changed for u in updates)
        raw_changed = any(c.complete or c.length > 0 for c in chunks)
        completes = any(c.complete for c in chunks)
        return dict(
            sink=self._index([u.sink for u in updates], S, L, sink_changed, prefix_only=True),
            raw=self._index([u.raw for u in updates], R, L, raw_changed),
            comp_new=_pad_lists([u.comp_new for u in updates]) if completes else None,
            comp=self._comp_index([u.comp for u in updates], C) if completes else Take.KEEP,
            comp_positions=_pad_lists([u.comp_new_positions for u in updates]) if completes else None,
        )

    def _index(self, lists: list[list[int]], width: int, L: int, changed: bool, prefix_only: bool = False):
        """Gather index into cat(old, chunk), or a `Take` shortcut when every row does the same thing."""
        if not changed:
            return Take.KEEP
        if all(not x for x in lists):
            return Take.EMPTY
        if not prefix_only and all(x == list(range(width + L)) for x in lists):
            return Take.CAT
        return _pad_lists(lists)

    def _comp_index(self, lists: list[list[int]], width: int):
        if all(x[:width] == list(range(width)) and len(x) == len(lists[0]) for x in lists):
            return Take.CAT  # every row had `width` entries and gains the same number
        return _pad_lists(lists)

    def _advance(self, chunks: list[RowChunk], updates: list[RowUpdate]) -> None:
        cfg = self.cfg
        for b, (row, ch, up) in enumerate(zip(self.state.rows, chunks, updates)):
            if not ch.length:
                continue
            self.ptr[b] += ch.n
            row.tokens += ch.n
            row.sink = len(up.sink)
            row.raw = len(up.raw)
            if ch.complete:
                row.comp += len(up.comp_new)
                row.windows += 1
                row.win_raw = cfg.window - cfg.stride
                row.rem = 0
                row.ratio = None
                row.bare = 0
            else:
                row.win_raw += ch.n
                row.bare += ch.n if ch.bare else 0
                if ch.ratio and cfg.interleaved:
                    row.rem = (row.rem + ch.n) % ch.ratio
