"""The KV cache the layer loop writes into: per layer, preallocated K, V buffers and a length.

It is a transformers ``Cache`` so generate() carries it between steps, and its resident layers
implement ``update`` too, so a stock forward (the fallback paths) can run on it. With KV offload some
layers are host-resident instead (offload.py: ``move_to_host``; placement.py decides which), and the
layer loop streams them. The capacity rule here (``capacity_for``) is the one the planner sizes KV by.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

ALIGN = 256              # capacity granularity (positions)
GROWTH = 1.25            # geometric growth factor when a step overflows the capacity
PREFILL_HEADROOM = 1024  # spare positions after a prompt, so the first decode steps do not grow the buffers


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

    def view(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [0, end), as views of the buffers."""
        return self.k_buf[:, :, :end], self.v_buf[:, :, :end]

    def band(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [lo, hi) (ring.py's layers keep only a window of them)."""
        return self.k_buf[:, :, lo:hi], self.v_buf[:, :, lo:hi]

    def slots(self, index: torch.Tensor) -> torch.Tensor:
        """Where positions ``index`` live in the buffers: here, at themselves."""
        return index

    def position_limit(self) -> float:
        """Positions a one-token step can reach without growing the buffers."""
        return 0 if self.k_buf is None else self.k_buf.shape[2]

    def nbytes(self) -> int:
        return 0 if self.k_buf is None else 2 * self.k_buf.numel() * self.k_buf.element_size()


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

    def crop(self, tokens_to_remove: int) -> None:
        # negative: remove that many; positive (transformers' legacy meaning): keep that many
        self.length = max(0, self.length + tokens_to_remove) if tokens_to_remove < 0 else min(self.length, tokens_to_remove)

    @property
    def batch_size(self) -> int:
        return self.k_buf.shape[0] if self.k_buf is not None else -1


class ChunkKVLayer(KVBuffers, CachedPositions):
    """One layer's K, V resident on the model's device: the first ``length`` positions are valid."""

    window: int | None = None  # ring.py's sliding-window layers keep only their window

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


class ChunkKVCache(Cache):
    """A transformers Cache of ChunkKVLayer, one per decoder layer.

    ``key_starts`` records each sequence's left padding (first visible cache position) as read from
    the attention mask of the last call that read it; decode steps reuse it instead of re-reading
    the mask on the host (see convert.py for the assumption this makes).
    """

    def __init__(self, num_layers: int, host=None, windows=None) -> None:
        """``windows``: per layer the sliding window or None; a windowed layer keeps a ring of its window
        (kv/ring.py), the others every position."""
        from .ring import RingKVLayer

        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise ValueError(f"windows has {len(windows)} entries for {num_layers} layers")
        super().__init__(layers=[RingKVLayer(w) if w else ChunkKVLayer() for w in windows])
        self.key_starts: list[int] | None = None
        self.key_starts_known = False
        self.host = host          # offload.HostKV when this cache may offload layers
        self.staging = None       # offload.Staging once a layer is host-resident

    def streamed_layers(self) -> list[int]:
        """Indices of the layers whose K, V live in host memory."""
        return [i for i, layer in enumerate(self.layers) if not isinstance(layer, ChunkKVLayer)]

    def device_kv(self) -> tuple[int, int]:
        """(bytes of the device-resident K, V buffers and the offload staging, their largest capacity)."""
        layers = [layer for layer in self.layers if isinstance(layer, ChunkKVLayer) and layer.k_buf is not None]
        nbytes = sum(layer.nbytes() for layer in layers)
        nbytes += self.staging.nbytes() if self.staging is not None else 0
        full = [layer.k_buf.shape[2] for layer in layers if layer.window is None]
        return nbytes, max(full, default=0)

    def host_kv_bytes(self) -> int:
        """Bytes of the host-resident layers' K, V regions."""
        return sum(2 * layer.k_buf.numel() * layer.k_buf.element_size()
                   for layer in self.layers if not isinstance(layer, ChunkKVLayer) and layer.k_buf is not None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def reset(self) -> None:
        super().reset()
        self.key_starts, self.key_starts_known = None, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.key_starts_known = False

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.key_starts_known = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.key_starts_known = False

    @classmethod
    def adopt(cls, cache: Cache, num_layers: int, windows=None) -> "ChunkKVCache":
        """A ChunkKVCache holding a copy of a stock cache's K, V (the stock cache is left as it was).
        Raises ValueError when the stock cache does not hold every position a later query can see
        (all of them for a full-attention layer, the last window - 1 for a sliding one)."""
        if len(cache.layers) != num_layers:
            raise ValueError(f"past_key_values has {len(cache.layers)} layers, the model has {num_layers}")
        new = cls(num_layers, windows=windows)
        for i, (src, dst) in enumerate(zip(cache.layers, new.layers)):
            keys, values = getattr(src, "keys", None), getattr(src, "values", None)
            n = src.get_seq_length()
            window = dst.window
            held = n if window is None else min(n, window - 1)
            if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[2] < held or (
                    window is None and keys.shape[2] != n):
                raise ValueError(
                    f"past_key_values layer {i} ({type(src).__name__}) does not hold the {held} cached positions "
                    "later tokens attend to; chunkinfer cannot continue it. Pass past_key_values=None "
                    "or a ChunkKVCache returned by the converted model.")
            b, h, _, d = keys.shape
            dst.reserve(b, h, d, keys.dtype, keys.device, n)
            if window is None:
                dst.write(keys, values, 0)
            else:
                dst.length = n - held  # the ring's positions [n - held, n)
                dst.write_at(torch.arange(n - held, n, device=keys.device), keys[:, :, keys.shape[2] - held:],
                             values[:, :, values.shape[2] - held:])
            dst.length = n
        return new
