"""The label a causal LM loss skips.

``labels`` of a beacon model are the input ids, unshifted, as in transformers: position ``t`` is predicted from
tokens ``< t``. Positions set to `IGNORE_INDEX` are left out of the loss and of its token count (padding, a
prompt, the first window when `BeaconConfig.masks_first_window` says so).
"""

IGNORE_INDEX = -100
"""``torch.nn.functional.cross_entropy``'s default ``ignore_index``, which transformers' losses use too."""

