"""One layer's K, V resident on its device: preallocated buffers and a length (ChunkKVLayer), the
capacity rule the cache grows them by and the planner sizes KV with (``capacity_for``), and the
transformers layer interface they answer (CachedPositions). cache.py assembles layers into a Cache;
ring.py bounds a sliding-window layer; offload.py keeps a layer in host memory.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

ALIGN = 256              # capacity granularity (positions)
GROWTH = 1.25            # geometric growth factor when a step overflows the capacity
PREFILL_HEADROOM = 1024  # spare positions after a prompt, so the first decode steps do not grow the buffers
STEP_TOKENS = 64         # new tokens per sequence a step takes (the decode kernels); longer appends are prompts


def round_up_positions(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def capacity_for(current: int, needed: int, headroom: int) -> int:
    """The capacity a buffer of ``current`` positions (0: none yet) has after ``needed`` are reserved:
    unchanged when they fit; else room for ``needed + headroom``, and at least ``GROWTH`` times the old
    capacity, so that steps appended one at a time reallocate rarely. The planner sizes KV by this rule."""
    if current >= needed:
        return current
    cap = round_up_positions(needed + headroom)
    return max(cap, round_up_positions(int(current * GROWTH))) if current else cap


class KVBuffers:
    """K, V buffers [B, Hkv, capacity, D] and the in-place writes the layer loop makes into them."""

    def __init__(self) -> None:
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    def reserve(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                needed: int, headroom: int = 0, keep: int = 0) -> bool:
        """Make room for ``needed`` positions; reallocates (copying the first ``keep``) only when short.
        Returns whether the buffers were reallocated."""
        current = 0 if self.k_buf is None else self.k_buf.shape[2]
        if current >= needed:
            return False
        cap = capacity_for(current, needed, headroom)
        k = torch.empty(batch, n_kv, cap, head_dim, dtype=dtype, device=device)
        v = torch.empty_like(k)
        if keep:
            k[:, :, :keep].copy_(self.k_buf[:, :, :keep])
            v[:, :, :keep].copy_(self.v_buf[:, :, :keep])
        self.k_buf, self.v_buf = k, v
        return True

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Write k, v [B, Hkv, n, D] at positions [start, start + n) (capacity must be reserved)."""
        n = k.shape[2]
        self.k_buf[:, :, start:start + n].copy_(k)
        self.v_buf[:, :, start:start + n].copy_(v)

    def band(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [lo, hi) (ring.py's layers keep only a window of them)."""
        return self.k_buf[:, :, lo:hi], self.v_buf[:, :, lo:hi]

    def slots(self, index: torch.Tensor) -> torch.Tensor:
        """Where positions ``index`` live in the buffers: here, at themselves."""
        return index

    def position_limit(self, new_tokens: int = 1) -> float:
        """Positions a step of ``new_tokens`` can reach without growing the buffers."""
        return 0 if self.k_buf is None else self.k_buf.shape[2]

    def view(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, end), as views of the buffers."""
        return self.k_buf[:, :, :end], self.v_buf[:, :, :end]

    def nbytes(self) -> int:
        return 0 if self.k_buf is None else 2 * self.k_buf.numel() * self.k_buf.element_size()


def cropped_length(length: int, tokens_to_remove: int) -> int:
    """The length a transformers ``DynamicLayer`` of ``length`` positions has after ``crop(tokens_to_remove)``,
    found by asking the installed transformers (on a meta tensor): its meaning of negative, zero and positive
    arguments, its errors and warnings, whatever the version."""
    shadow = DynamicLayer()
    shadow.keys = shadow.values = torch.empty(1, 1, length, 1, device="meta")  # not empty: 5.17 counts numel
    shadow.is_initialized = True
    shadow.crop(tokens_to_remove)
    return shadow.keys.shape[2]


class CachedPositions(CacheLayerMixin):
    """What transformers asks of a cache layer, for K, V buffers [B, Hkv, capacity, D] of which the
    first ``length`` positions are valid, wherever the buffers live."""

    is_sliding = False  # keeps every position; the loop applies sliding windows itself
    is_compileable = False
    is_croppable = True

    def __init__(self) -> None:  # no CacheLayerMixin.__init__: keys/values are views, not attributes
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None
        self.length = 0
        self.is_initialized = False

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.k_buf is None else self.k_buf[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.v_buf is None else self.v_buf[:, :, : self.length]

    def held_shape(self) -> tuple[int, int, int, torch.dtype] | None:
        """(batch, KV heads, head dim, dtype) of the K, V held; None while nothing is."""
        if self.k_buf is None or not self.length:
            return None
        b, h, _, d = self.k_buf.shape
        return b, h, d, self.k_buf.dtype

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0

    window: int | None = None  # ring.py's sliding-window layers keep only their window

    def crop(self, tokens_to_remove: int) -> None:
        self.crop_to(cropped_length(self.length, tokens_to_remove))

    def crop_to(self, length: int) -> None:
        self.length = min(self.length, length)

    @property
    def batch_size(self) -> int:
        return self.k_buf.shape[0] if self.k_buf is not None else -1


class ChunkKVLayer(KVBuffers, CachedPositions):
    """One layer's K, V resident on the model's device: the first ``length`` positions are valid."""

    def __init__(self) -> None:
        CachedPositions.__init__(self)

    def reserve(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                needed: int, headroom: int = 0, new_tokens: int = 1) -> None:
        """Make room for ``needed`` positions, keeping the valid ones (every position is kept, however
        many a call writes at a time: ``new_tokens`` matters to ring.py's sliding-window layers)."""
        KVBuffers.reserve(self, batch, n_kv, head_dim, dtype, device, needed, headroom, keep=self.length)
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    # ---- transformers' CacheLayerMixin ----
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.reserve(b, h, d, key_states.dtype, key_states.device, 0)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b, h, n, d = key_states.shape
        self.reserve(b, h, d, key_states.dtype, key_states.device, self.length + n)
        self.write(key_states, value_states, self.length)
        self.length += n
        return self.keys, self.values

    def _map_batch(self, fn) -> None:
        if self.k_buf is not None:
            self.k_buf, self.v_buf = fn(self.k_buf), fn(self.v_buf)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])
