"""A bounded LRU of the KV of finished sequences, matched by longest common prefix.

A chat's next turn re-sends the whole conversation: its prompt starts with the
previous turn's prompt and reply. Keeping each finished sequence's KV (prompt +
generated tokens) lets the engine copy that prefix into the new sequence's slot
and prefill only the new message. Entries are plain token arrays with their KV;
lookups compare against every entry, so the entry count is capped to keep that
cheap.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

import numpy as np
import torch


@dataclass(slots=True)
class PrefixMatch:
    kv: torch.Tensor  # [num_layers, 2, kv_heads, length, head_dim]; only the first ``length`` apply
    length: int


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = 64):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[int, tuple[np.ndarray, torch.Tensor]] = OrderedDict()  # LRU first
        self._ids = count()
        self.bytes = 0
        self.queries = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, token_ids: list[int], max_length: int) -> PrefixMatch | None:
        """The cached entry sharing the longest prefix with ``token_ids``, capped at
        ``max_length`` tokens (the engine must still compute at least one token)."""
        self.queries += 1
        if max_length <= 0 or not self._entries:
            return None
        tokens = np.asarray(token_ids[:max_length], dtype=np.int64)
        best_key, best_length = None, 0
        for key, (cached, _) in self._entries.items():
            length = _common_prefix_length(cached, tokens)
            if length > best_length:
                best_key, best_length = key, length
        if best_key is None:
            return None
        self.hits += 1
        self._entries.move_to_end(best_key)
        return PrefixMatch(self._entries[best_key][1], best_length)

    def insert(self, token_ids: list[int], kv: torch.Tensor) -> None:
        """Keep ``kv`` (the KV of exactly ``token_ids``); entries it extends become redundant."""
        size = kv.numel() * kv.element_size()
        if not token_ids or size > self.max_bytes:
            return
        tokens = np.asarray(token_ids, dtype=np.int64)
        for key, (cached, cached_kv) in list(self._entries.items()):
            shared = _common_prefix_length(cached, tokens)
            if shared == len(tokens):  # already covered by a longer (or equal) entry
                self._entries.move_to_end(key)
                return
            if shared == len(cached):
                del self._entries[key]
                self.bytes -= cached_kv.numel() * cached_kv.element_size()
        self._entries[next(self._ids)] = (tokens, kv)
        self.bytes += size
        while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()


def _common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    mismatches = np.flatnonzero(a[:n] != b[:n])
    return int(mismatches[0]) if mismatches.size else n
