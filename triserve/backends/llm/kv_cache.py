"""The per-slot key/value cache of the running sequences.

Each layer holds one K and one V tensor shaped ``[slots, kv_heads, capacity,
head_dim]``. Running sequences occupy slots ``0..n-1`` with no gaps (the engine
moves the last sequence into a freed slot), so a decode step attends over the
view ``[:n, :, :length]`` without gathering anything. Both ``slots`` and
``capacity`` grow on demand, in blocks, up to ``max_num_seqs`` and
``max_model_len``: a server that only ever sees short chats never pays for
16 x 2048 tokens of cache.
"""

from __future__ import annotations

import torch

#: capacity grows in multiples of this many tokens, so that growth (a copy) is rare
CAPACITY_BLOCK = 256


class KVCache:
    def __init__(self, num_layers: int, max_slots: int, kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype):
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._allocate(0, 0)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * element

    @property
    def bytes_allocated(self) -> int:
        return self.slots * self.capacity * self.bytes_per_token

    def reserve(self, slots: int, length: int) -> None:
        """Make room for ``slots`` sequences of up to ``length`` tokens each."""
        if slots > self.max_slots or length > self.max_len:
            raise ValueError(f"KV cache request of {slots} slots x {length} tokens exceeds "
                             f"{self.max_slots} slots x {self.max_len} tokens")
        if slots <= self.slots and length <= self.capacity:
            return
        new_slots = max(self.slots, min(self.max_slots, _round_up(slots, 4)))
        new_capacity = max(self.capacity, min(self.max_len, _round_up(length, CAPACITY_BLOCK)))
        self._allocate(new_slots, new_capacity)

    def _allocate(self, slots: int, capacity: int) -> None:
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        old_keys, old_values = self.keys, self.values
        self.keys = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        for old, new in zip(old_keys + old_values, self.keys + self.values):
            new[: old.shape[0], :, : old.shape[2]] = old

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``source`` into slot ``target``."""
        for tensor in self.keys + self.values:
            tensor[target, :, :length] = tensor[source, :, :length]

    def export(self, slot: int, length: int) -> torch.Tensor:
        """A standalone copy of a slot's first ``length`` positions:
        ``[num_layers, 2, kv_heads, length, head_dim]`` (what the prefix cache keeps)."""
        return torch.stack([
            torch.stack((k[slot, :, :length], v[slot, :, :length]))
            for k, v in zip(self.keys, self.values)
        ])

    def load(self, slot: int, kv: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of an exported ``kv`` into ``slot``."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k[slot, :, :length] = kv[layer, 0, :, :length]
            v[slot, :, :length] = kv[layer, 1, :, :length]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
