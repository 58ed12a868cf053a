"""Pure bookkeeping of progressive compression: which tokens form the next chunk, where beacons go, which
positions everything gets, and what the memory keeps afterwards. No `nn.Module` here.

A *chunk* is the not-yet-processed raw tokens of a row's open window that this call supplies, so one forward
pass never crosses a window boundary. Every row of a batch is scheduled over its own tokens (left or right
padding is skipped), and the rows of a step are padded to a common length. All index lists are built once per
step and shared by every layer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .config import BeaconConfig
from .memory import MemoryState

Index = Optional[torch.Tensor]  # (B, T) gather index into cat(a, b) along the sequence; see `select_entries`
KEEP, CAT, EMPTY = "keep", "cat", "empty"


def _pad_lists(lists: list[list[int]], device) -> torch.Tensor:
    width = max((len(x) for x in lists), default=0)
    out = torch.zeros(len(lists), width, dtype=torch.long)
    for b, x in enumerate(lists):
        if x:
            out[b, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    return out.to(device)


@dataclass
class RowChunk:
    """The chunk of one row: ``n`` raw tokens followed/interleaved by ``beacons`` beacons."""

    n: int = 0
    beacons: int = 0
    ratio: int = 0
    complete: bool = False  # the chunk completes its window: beacons move to the compressed memory
    raw_entries: Optional[torch.Tensor] = None  # (n,) entry index of each raw token within the chunk
    beacon_entries: Optional[torch.Tensor] = None  # (beacons,) entry index of each beacon
    beacon_local: Optional[torch.Tensor] = None  # (beacons,) window-local beacon index j
    beacon_positions: Optional[torch.Tensor] = None  # (beacons,) explicit positions (append + scoped), else None

    @property
    def length(self) -> int:
        return self.n + self.beacons


@dataclass
class StepPlan:
    """Everything one forward step needs, as tensors on the model's device. Shapes: B rows, L chunk entries."""

    input_cols: torch.Tensor  # (B, L) input column of raw entries (0 elsewhere)
    is_beacon: torch.Tensor  # (B, L) bool
    valid: torch.Tensor  # (B, L) bool: a real entry (not padding)
    position_ids: torch.Tensor  # (B, L)
    local: torch.Tensor  # (B, L) window-local index of each entry
    ratio: torch.Tensor  # (B,) ratio of each row's window (0: none)
    sink_len: torch.Tensor  # (B,) memory lengths before the step
    comp_len: torch.Tensor
    raw_len: torch.Tensor
    mem_positions: torch.Tensor  # (B, S + R) positions of the pre-RoPE memory parts (sink, raw cache)
    widths: tuple[int, int, int]  # padded widths (S, C, R) of the memory parts before the step
    mem_raw_is_beacon: torch.Tensor  # (B, R) raw-cache metadata before the step
    mem_raw_local: torch.Tensor
    out_dst: torch.Tensor  # (n_raw,) flat index into (B * N) of each raw entry's input column
    out_src: torch.Tensor  # (n_raw,) flat index into (B * L) of that raw entry
    has_beacons: bool
    scoped: bool  # beacons in this step see only part of their window (step-expansion / segmentation)
    plain: bool  # no padding anywhere and not scoped: the mask is plain bottom-right causal
    beacon_flat: Optional[torch.Tensor]  # (n_beacons,) flat index into (B * L) of beacon entries
    # memory update, applied identically by every layer (see `select_entries`)
    sink_index: object
    raw_index: object
    comp_new_index: object  # entries of cat(raw, chunk) that enter the compressed memory (pre-RoPE)
    comp_new_positions: Optional[torch.Tensor]  # (B, K) positions they are rotated to
    comp_index: object  # how cat(comp, new) is compacted
    raw_meta_is_beacon: torch.Tensor  # (B, R') raw-cache metadata after the step
    raw_meta_local: torch.Tensor


def select_entries(a: torch.Tensor, b: torch.Tensor, how, dim: int = 2) -> torch.Tensor:
    """Take entries of ``cat(a, b)`` along ``dim`` as told by ``how``: keep ``a``, ``cat``, ``empty``, or a gather
    index ``(B, T)`` into the concatenation."""
    if isinstance(how, str):
        if how == KEEP:
            return a
        if how == CAT:
            return torch.cat((a, b), dim=dim)
        return a.narrow(dim, 0, 0)
    src = torch.cat((a, b), dim=dim)
    if dim == 1:  # metadata (B, T)
        return src.gather(1, how)
    index = how[:, None, :, None].expand(src.shape[0], src.shape[1], how.shape[1], src.shape[3])
    return src.gather(2, index)  # (B, H, T, D)


class RatioPicker:
    """Chooses compression ratios the way ``ratio_mix`` says (see `BeaconConfig`)."""

    def __init__(self, config: BeaconConfig, max_positions: Optional[int]):
        self.config = config
        self.max_positions = max_positions
        self.rng = random.Random(config.ratio_seed) if config.ratio_seed is not None else random
        self.override: Optional[int] = None
        self.last_call: list[int] = []  # ratio of every window step of the most recent forward call

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


class Scheduler:
    """Plans the chunks of one forward call over ``cols[b]`` (the input columns of row b's real tokens)."""

    def __init__(self, config: BeaconConfig, state: MemoryState, cols: list[torch.Tensor], n_columns: int,
                 training: bool, picker: RatioPicker, device):
        self.cfg = config
        self.state = state
        self.cols = cols
        self.ptr = [0] * len(cols)
        self.n_columns = n_columns
        self.training = training
        self.picker = picker
        self.device = device
        longest = max((len(c) for c in cols), default=0)
        self.sequence_length = max(r.tokens for r in state.rows) + longest

    def done(self) -> bool:
        return all(p >= len(c) for p, c in zip(self.ptr, self.cols))

    # --- per-row layout -----------------------------------------------------------------------------------
    def _row_chunk(self, b: int, ratio_for_step: Callable[[], int]) -> RowChunk:
        cfg, row = self.cfg, self.state.rows[b]
        avail = len(self.cols[b]) - self.ptr[b]
        if avail <= 0:
            return RowChunk()
        n = min(cfg.window - row.win_raw, avail)
        no_beacons = self.training and n == avail  # official: the final window of a training call gets none
        complete = row.win_raw + n == cfg.window and not no_beacons
        wants_beacons = not no_beacons and (cfg.placement == "interleave" or complete)
        if wants_beacons and row.ratio is None:
            row.ratio = ratio_for_step()
        r = row.ratio if wants_beacons else 0
        chunk = RowChunk(n=n, ratio=r or 0, complete=complete)
        i = torch.arange(n)
        if not r:
            chunk.raw_entries = i
            return chunk
        if cfg.placement == "interleave":
            nb = (row.rem + n) // r
            chunk.raw_entries = i + (row.rem + i) // r
            j = torch.arange(nb)
            chunk.beacon_entries = (j + 1) * r - row.rem - 1 + j + 1
            chunk.beacon_local = j + (row.win_raw - row.rem) // r
        else:
            nb = cfg.stride // r
            chunk.raw_entries = i
            chunk.beacon_entries = n + torch.arange(nb)
            chunk.beacon_local = torch.arange(nb)
            if cfg.attention_scope != "full-coverage":
                start = row.sink + row.comp  # position of the window's first raw token
                step = r + 1 if cfg.attend_prev else r
                chunk.beacon_positions = start + (chunk.beacon_local + 1) * step - (1 if cfg.attend_prev else 0)
        chunk.beacons = nb
        return chunk

    # --- one step -----------------------------------------------------------------------------------------
    def plan(self) -> Optional[StepPlan]:
        if self.done():
            return None
        cfg, st = self.cfg, self.state
        drawn: list[int] = []

        def ratio_for_step() -> int:  # one draw per step, shared by the rows that start a window in it
            if not drawn:
                drawn.append(self.picker.pick(st, self.sequence_length))
                st.ratio_log.append(drawn[0])
            return drawn[0]

        chunks = [self._row_chunk(b, ratio_for_step) for b in range(len(st.rows))]
        st.step_log.append([(c.length, r.sink + r.comp + r.raw, c.beacons) for c, r in zip(chunks, st.rows)])
        B, L = len(chunks), max(c.length for c in chunks)
        S = max(r.sink for r in st.rows)
        C = max(r.comp for r in st.rows)
        R = max(r.raw for r in st.rows)
        raw_is_beacon = st.raw_is_beacon.cpu()
        raw_local = st.raw_local.cpu()

        input_cols = torch.zeros(B, L, dtype=torch.long)
        is_beacon = torch.zeros(B, L, dtype=torch.bool)
        valid = torch.zeros(B, L, dtype=torch.bool)
        position_ids = torch.zeros(B, L, dtype=torch.long)
        local = torch.zeros(B, L, dtype=torch.long)
        out_dst, out_src = [], []
        sink_lists, raw_lists, comp_new_lists, comp_lists = [], [], [], []
        new_raw_beacon, new_raw_local, comp_new_pos = [], [], []
        sink_changes = raw_changes = comp_changes = False

        for b, (row, ch) in enumerate(zip(st.rows, chunks)):
            mem_len = row.sink + row.comp + row.raw
            Lb = ch.length
            valid[b, :Lb] = True
            position_ids[b, :Lb] = mem_len + torch.arange(Lb)
            if ch.n:
                cols = self.cols[b][self.ptr[b] : self.ptr[b] + ch.n]
                input_cols[b, ch.raw_entries] = cols
                local[b, ch.raw_entries] = row.win_raw + torch.arange(ch.n)
                out_dst.append(b * self.n_columns + cols)
                out_src.append(b * L + ch.raw_entries)
            if ch.beacons:
                is_beacon[b, ch.beacon_entries] = True
                local[b, ch.beacon_entries] = ch.beacon_local
                if ch.beacon_positions is not None:
                    position_ids[b, ch.beacon_entries] = ch.beacon_positions

            # sink: while nothing is compressed yet, the first entries of every chunk (official semantics)
            new_sink = row.sink
            if cfg.sink_size and Lb and row.comp == 0:
                new_sink = min(cfg.sink_size, Lb)
                sink_lists.append(list(range(S, S + new_sink)))
                sink_changes = True
            else:
                sink_lists.append(list(range(row.sink)))

            # entries of cat(raw cache, chunk) in window order, with their kind and window-local index
            chunk_kinds = is_beacon[b, :Lb].tolist()
            chunk_local = local[b, :Lb].tolist()
            entries = list(range(row.raw)) + [R + e for e in range(Lb)]
            kinds = raw_is_beacon[b, : row.raw].tolist() + chunk_kinds
            locs = raw_local[b, : row.raw].tolist() + chunk_local
            if ch.complete:
                raw_ids = [k for k, beacon in enumerate(kinds) if not beacon]
                leaving = raw_ids[: cfg.stride]  # the first `stride` raw tokens leave the window
                overlap = raw_ids[cfg.stride :]
                if ch.ratio:
                    moved = [k for k, beacon in enumerate(kinds) if beacon]
                else:  # compression off: the leaving raw activations themselves are kept
                    moved = leaving
                comp_new_lists.append([entries[k] for k in moved])
                comp_new_pos.append(list(range(new_sink + row.comp, new_sink + row.comp + len(moved))))
                comp_lists.append(list(range(row.comp)) + [C + k for k in range(len(moved))])
                raw_lists.append([entries[k] for k in overlap])
                new_raw_beacon.append([False] * len(overlap))
                new_raw_local.append([locs[k] - cfg.stride for k in overlap])
                comp_changes = True
                raw_changes = True
            else:
                comp_new_lists.append([])
                comp_new_pos.append([])
                comp_lists.append(list(range(row.comp)))
                raw_lists.append(entries)
                new_raw_beacon.append(kinds)
                new_raw_local.append(locs)
                raw_changes = raw_changes or Lb > 0

        has_beacons = bool(is_beacon.any())
        scoped = cfg.attention_scope != "full-coverage" and has_beacons
        plan = StepPlan(
            input_cols=input_cols.to(self.device),
            is_beacon=is_beacon.to(self.device),
            valid=valid.to(self.device),
            position_ids=position_ids.to(self.device),
            local=local.to(self.device),
            ratio=torch.tensor([c.ratio for c in chunks], device=self.device),
            sink_len=torch.tensor([r.sink for r in st.rows], device=self.device),
            comp_len=torch.tensor([r.comp for r in st.rows], device=self.device),
            raw_len=torch.tensor([r.raw for r in st.rows], device=self.device),
            mem_positions=torch.cat(
                (torch.arange(S).expand(B, S),
                 torch.tensor([[r.sink + r.comp] for r in st.rows]) + torch.arange(R)), dim=1).to(self.device),
            widths=(S, C, R),
            mem_raw_is_beacon=st.raw_is_beacon,
            mem_raw_local=st.raw_local,
            out_dst=torch.cat(out_dst).to(self.device),
            out_src=torch.cat(out_src).to(self.device),
            has_beacons=has_beacons,
            scoped=scoped,
            plain=not scoped
            and all(c.length == L for c in chunks)
            and all((r.sink, r.comp, r.raw) == (S, C, R) for r in st.rows),
            beacon_flat=is_beacon.flatten().nonzero().squeeze(1).to(self.device) if has_beacons else None,
            sink_index=self._index(sink_lists, S, L, sink_changes, prefix_only=True),
            raw_index=self._index(raw_lists, R, L, raw_changes),
            comp_new_index=_pad_lists(comp_new_lists, self.device) if comp_changes else None,
            comp_new_positions=_pad_lists(comp_new_pos, self.device) if comp_changes else None,
            comp_index=self._comp_index(comp_lists, C) if comp_changes else KEEP,
            raw_meta_is_beacon=_pad_lists([[int(x) for x in k] for k in new_raw_beacon], self.device).bool(),
            raw_meta_local=_pad_lists(new_raw_local, self.device),
        )
        self._advance(chunks, sink_lists, comp_new_lists, raw_lists)
        st.raw_is_beacon, st.raw_local = plan.raw_meta_is_beacon, plan.raw_meta_local
        return plan

    def _index(self, lists: list[list[int]], width: int, L: int, changed: bool, prefix_only: bool = False):
        """Gather index into cat(old, chunk), or a fast path when every row does the same thing."""
        if not changed:
            return KEEP
        if all(not x for x in lists):
            return EMPTY
        if not prefix_only and all(x == list(range(width + L)) for x in lists):
            return CAT
        return _pad_lists(lists, self.device)

    def _comp_index(self, lists: list[list[int]], width: int):
        if all(x[:width] == list(range(width)) and len(x) == len(lists[0]) for x in lists):
            return CAT  # every row had `width` entries and gains the same number
        return _pad_lists(lists, self.device)

    def _advance(self, chunks: list[RowChunk], sink_lists, comp_new_lists, raw_lists) -> None:
        cfg, st = self.cfg, self.state
        for b, (row, ch) in enumerate(zip(st.rows, chunks)):
            if not ch.length:
                continue
            self.ptr[b] += ch.n
            row.tokens += ch.n
            row.sink = len(sink_lists[b])
            row.raw = len(raw_lists[b])
            if ch.complete:
                row.comp += len(comp_new_lists[b])
                row.windows += 1
                row.win_raw = cfg.window - cfg.stride
                row.rem = 0
                row.ratio = None
            else:
                row.win_raw += ch.n
                if ch.ratio and cfg.placement == "interleave":
                    row.rem = (row.rem + ch.n) % ch.ratio
