"""The per-slot key/value cache of the running sequences: one allocation, made once.

Each layer holds one K and one V view shaped ``[slots, kv_heads, capacity,
head_dim]`` of a single buffer. Running sequences occupy slots ``0..n-1`` with
no gaps (the engine moves the last sequence into a freed slot), so a decode
step attends over the view ``[:n, :, :length]`` without gathering anything, and
nothing is ever reallocated or copied to grow.

The buffer is an anonymous memory map: the operating system hands it out as
zero pages and backs a page with memory only when it is first written, so a
server that only ever sees short chats holds (resident) only the KV of the
positions it used, not ``slots x capacity`` (on a GPU the buffer is allocated
whole, as every GPU server does). Its size — what is *reserved* — is
fixed by the engine from a byte budget (``kv_cache_mb``).

``spare_slots`` adds slots beyond ``slots`` that no sequence ever holds: a CUDA graph's
padding rows (a batch padded up to the captured size) write their K/V there (``scratch_slot``),
never into a running sequence's slot.
"""

from __future__ import annotations

import mmap

import torch


class KVCache:
    def __init__(self, num_layers: int, max_slots: int, kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device = torch.device("cpu"),
                 spare_slots: int = 0):
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.spare_slots = spare_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        allocated = max_slots + spare_slots
        shape = (allocated, kv_heads, max_len, head_dim)
        count = allocated * kv_heads * max_len * head_dim
        if device.type == "cpu":
            self._map = mmap.mmap(-1, max(1, 2 * num_layers * count * _element_size(dtype)))
            # one tensor (one storage) per layer's K and per layer's V over the one map: nothing
            # aliases anything else, as a compiled decode step needs of the caches it writes
            tensors = [torch.frombuffer(self._map, dtype=dtype, count=count,
                                        offset=index * count * _element_size(dtype)).view(shape)
                       for index in range(2 * num_layers)]
        else:  # an accelerator's memory is reserved whole
            tensors = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.keys: list[torch.Tensor] = tensors[0::2]
        self.values: list[torch.Tensor] = tensors[1::2]
        self._slot_views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def slot_views(self, slot: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's K and V of one slot, ``[kv_heads, capacity, head_dim]`` (made once per slot)."""
        views = self._slot_views.get(slot)
        if views is None:
            views = self._slot_views[slot] = ([k[slot] for k in self.keys], [v[slot] for v in self.values])
        return views

    @staticmethod
    def bytes_per_token_of(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one token across all layers."""
        return 2 * num_layers * kv_heads * head_dim * _element_size(dtype)

    @property
    def slots(self) -> int:
        return self.max_slots

    @property
    def scratch_slot(self) -> int | None:
        """The first spare slot (never a sequence's), or None without one."""
        return self.max_slots if self.spare_slots else None

    @property
    def capacity(self) -> int:
        return self.max_len

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_per_token_of(self.num_layers, self.kv_heads, self.head_dim, self.dtype)

    @property
    def bytes_reserved(self) -> int:
        return (self.max_slots + self.spare_slots) * self.max_len * self.bytes_per_token

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


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
