"""The KV cache the layer loop writes into: per layer, preallocated K, V buffers and a length.

It is a transformers ``Cache`` so generate() carries it between steps, and its resident layers
implement ``update`` too, so a stock forward (the fallback paths) can run on it. With KV offload some
layers are host-resident instead (offload.py: ``move_to_host``; placement.py decides which), and the
layer loop streams them. Each resident layer is device_layer.py's (a sliding one ring.py's).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache

from .device_layer import ChunkKVLayer, cropped_length
from .offload import EncodedKVLayer
from .ring import RingKVLayer

def _new_layers(num_layers: int, windows) -> list:
    windows = [None] * num_layers if windows is None else list(windows)
    if len(windows) != num_layers:
        raise ValueError(f"windows has {len(windows)} entries for {num_layers} layers")
    return [RingKVLayer(w) if w else ChunkKVLayer() for w in windows]


class ChunkKVCache(DynamicCache):
    """A transformers ``DynamicCache`` whose layers are chunkinfer's: ChunkKVLayer on the device, or
    host-resident layers (offload.py). A DynamicCache the user passes is turned into one in place
    (``adopt_in_place``), so the object the user holds is the one that holds the K, V.

    ``key_starts``: each sequence's left padding (first visible cache position), from the attention
    mask of the last call. ``split_keys``: the key-range length the decode kernels split attention
    into, fixed for the cache's life at its first step, so that every step computes a row the same
    way whatever the step's length (see loop/step.py).
    """

    def __init__(self, num_layers: int, host=None, windows=None) -> None:
        """``windows``: per layer the sliding window or None; a windowed layer keeps a ring of its window
        (kv/ring.py), the others every position."""
        Cache.__init__(self, layers=_new_layers(num_layers, windows))
        self._init_state(host)

    def _init_state(self, host) -> None:
        self.key_starts: list[int] | None = None
        self.split_keys = 0           # 0: not chosen yet
        self.host = host              # offload.HostKV when this cache may offload layers
        self.staging = None           # offload.Staging once a layer is host-resident
        self.filled_by = None         # the binding of the model whose calls wrote it (forward.check_cache)

    @classmethod
    def adopt_in_place(cls, cache: DynamicCache, num_layers: int, host=None, windows=None) -> "ChunkKVCache":
        """Turn a stock DynamicCache into a ChunkKVCache in place (the same object), copying any K, V it
        holds into chunkinfer's layers (a sliding-window layer's ring takes the last window - 1, which is
        what stock's sliding layers keep). Raises ValueError, leaving it as it was, when it cannot be
        continued (another layer count, or layers without the positions later tokens attend to)."""
        if len(cache.layers) not in (0, num_layers):
            raise ValueError(f"the cache passed has {len(cache.layers)} layers, the model has {num_layers}")
        n = cache.get_seq_length() if cache.layers else 0
        sources = list(cache.layers)
        layers = _new_layers(num_layers, windows)
        for i, (src, dst) in enumerate(zip(sources, layers)):
            keys = getattr(src, "keys", None)
            length = src.get_seq_length()
            held = n if dst.window is None else min(n, dst.window - 1)
            if length != n or (length and (not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[2] < held
                                             or (dst.window is None and keys.shape[2] != length))):
                raise ValueError(
                    f"the cache passed holds {length} positions in layer {i} ({type(src).__name__}) but {n} in "
                    "layer 0, or not the positions later tokens attend to; chunkinfer cannot continue it. "
                    "Pass a new DynamicCache, or the cache a converted model returned.")
        for src, dst in zip(sources, layers):
            if n:
                b, h, _, d = src.keys.shape
                dst.reserve(b, h, d, src.keys.dtype, src.keys.device, n)
                if dst.window is None:
                    dst.write(src.keys, src.values, 0)
                else:  # the ring's positions [n - held, n)
                    held = min(n, dst.window - 1)
                    dst.write_at(torch.arange(n - held, n, device=src.keys.device),
                                 src.keys[:, :, src.keys.shape[2] - held:], src.values[:, :, src.values.shape[2] - held:])
                dst.length = n
        cache.layers = layers
        cache.layer_class_to_replicate = None
        cache.__class__ = cls
        cache._init_state(host)
        return cache

    def streamed_layers(self) -> list[int]:
        """Indices of the layers whose K, V live in host memory."""
        return [i for i, layer in enumerate(self.layers) if not isinstance(layer, ChunkKVLayer)]

    def device_kv(self) -> tuple[int, int]:
        """(bytes of the device-resident K, V buffers, the offload staging and K, V encoded on the device,
        the resident buffers' largest capacity)."""
        layers = [layer for layer in self.layers if isinstance(layer, ChunkKVLayer) and layer.k_buf is not None]
        nbytes = sum(layer.nbytes() for layer in layers)
        nbytes += self.staging.nbytes() if self.staging is not None else 0
        nbytes += sum(layer.nbytes() - layer.host_nbytes() for layer in self.layers if not isinstance(layer, ChunkKVLayer))
        full = [layer.k_buf.shape[2] for layer in layers if layer.window is None]
        return nbytes, max(full, default=0)

    def host_kv_bytes(self) -> int:
        """Bytes of the host-resident layers' K, V regions (encoded ones: blocks and spill pools)."""
        return sum(layer.host_nbytes() for layer in self.layers if not isinstance(layer, ChunkKVLayer))

    def kv_codec_report(self) -> list:
        """Per host layer whose K, V are encoded (convert(kv_compression="lossless")): what they cost, as
        encoded.LayerCodecReport (raw / stored bytes of K and V, spilled blocks, the spill pools)."""
        reports = [layer.codec_report(i) for i, layer in enumerate(self.layers) if isinstance(layer, EncodedKVLayer)]
        return [r for r in reports if r is not None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length if layer_idx < len(self.layers) else 0

    def batch_size_held(self) -> int | None:
        """The batch the cached K, V are for, None while empty."""
        for layer in self.layers:
            if (shape := layer.held_shape()) is not None:
                return shape[0]
        return None

    def crop(self, tokens_to_remove: int) -> None:
        new = cropped_length(self.get_seq_length(), tokens_to_remove)  # raises as transformers does
        for layer in self.layers:  # a ring raises first if it no longer holds what that length needs
            if layer.window is not None:
                layer.crop_to(new)
        for layer in self.layers:
            layer.crop_to(new)

    def reset(self) -> None:
        super().reset()
        self.key_starts = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.key_starts is not None:
            self.key_starts = [self.key_starts[i] for i in beam_idx.tolist()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.key_starts is not None:
            self.key_starts = [s for s in self.key_starts for _ in range(repeats)]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.key_starts is not None:
            self.key_starts = [self.key_starts[i] for i in torch.as_tensor(indices).tolist()]
