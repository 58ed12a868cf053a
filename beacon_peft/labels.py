"""The label a causal LM loss skips.

``labels`` of a beacon model are the input ids, unshifted, as in transformers: position ``t`` is predicted from
tokens ``< t``. Positions set to `IGNORE_INDEX` are left out of the loss and of its token count (padding, a
prompt, the first window when `BeaconConfig.masks_first_window` says so).
"""

IGNORE_INDEX = -100
"""``torch.nn.functional.cross_entropy``'s default ``ignore_index``, which transformers' losses use too."""


def check_labels(labels, batch: int, length: int, vocab: int) -> None:
    """``labels`` of a call over ``batch`` rows of ``length`` new tokens: an integer tensor of that shape holding
    token ids in ``[0, vocab)`` or `IGNORE_INDEX`; else a TypeError/ValueError naming what is wrong, raised before
    any window is read (the loss would otherwise fail, or mean something else, after the whole forward)."""
    import torch

    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor of token ids (batch, length), got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (torch.long), got dtype {labels.dtype}")
    if tuple(labels.shape) != (batch, length):
        raise ValueError(f"labels must have the input's shape (batch={batch}, length={length}), got shape "
                         f"{tuple(labels.shape)}")
    scored = labels[labels != IGNORE_INDEX]
    if scored.numel():
        low, high = int(scored.min()), int(scored.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"labels hold {bad}: allowed token ids in [0, {vocab - 1}] or {IGNORE_INDEX} (ignored)")
