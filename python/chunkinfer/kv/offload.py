"""Host-resident KV: layers whose K, V live in pinned host memory and are streamed through GPU staging.

A streamed layer's K, V are whole-sequence on the GPU only while that layer computes, in one of two
staging slots used in turn: the slot is filled from the host (the cached prefix), the layer writes its
new K, V into it, and the new positions go back to the host. Every copy runs on the transfer engine's
own streams, ordered against compute by CUDA events only: the host never waits for the GPU here.

  slot reuse      compute waits for the offload of the slot's previous layer (engine.wait)
  prefix fill     prefetch of the next streamed layer is issued when the current one starts, so it
                  overlaps the current layer's compute (decode steps, continued prompts)
  host growth     a larger pinned region is allocated and the whole layer [0, end) is offloaded into
                  it from the slot; the old region goes back to the arena once the prefetch that read
                  it is done (the engine holds the tensors of a copy until it completes)

With ``convert(kv_compression=...)`` every streamed layer is an EncodedKVLayer (encoded.py): its K, V are
encoded as they leave the slot (the host waits for each piece's spill count) and expanded into it on a
codec stream beside the compute stream; a layer may keep its blocks in device memory instead of the
host's when the planner puts it there, and then the staging has one slot, not two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .device_layer import CachedPositions, ChunkKVLayer, KVBuffers, round_up_positions
from .encoded import EncodedKV, KVCompression, LayerCodecReport, calibrated

_HOST_GROWTH_MIN = 4096  # positions added at least when a host layer grows (decode past the headroom)


class HostKV:
    """What a converted model keeps across calls for offloading: the pinned arena and the engine."""

    def __init__(self, device: torch.device, cpu_share=None, compression: KVCompression | None = None):
        from .transfer import KVTransferEngine, PinnedArena

        cuda = device.type == "cuda"
        index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else -1
        self.device = device
        self.arena = PinnedArena(slab_bytes=1 << 30, pinned=cuda, device=max(index, 0))
        self.engine = KVTransferEngine(index)  # holds both ends of a copy until it is done
        self.cpu_share = cpu_share  # host_attention.CpuShare: decode attends part of the host KV on the CPU
        self.compression = compression  # encoded.KVCompression: host layers keep their K, V encoded
        self.planned_ratio = 1.0        # the ratio the last prompt's plan sized encoded host KV by
        self._codec_stream = None

    def codec_stream(self) -> "torch.cuda.Stream":
        """The CUDA stream encoded layers are expanded on, beside the compute stream (made on first use)."""
        if self._codec_stream is None:
            self._codec_stream = torch.cuda.Stream(self.device)
        return self._codec_stream

    def spare_bytes(self) -> int:
        """Pinned bytes the arena holds but has not handed out."""
        return self.arena.bytes_reserved - self.arena.bytes_used

    def new_layer(self, on_device: bool = False) -> "HostKVLayer":
        """A streamed layer: raw in host memory, or (compression on) encoded in host memory or, with
        ``on_device``, encoded in the device's memory."""
        if self.compression is None:
            return HostKVLayer(self)
        return EncodedKVLayer(self, self.device if on_device else None)


class HostKVLayer(CachedPositions):
    """One streamed layer's K, V in pinned host memory: [B, Hkv, capacity, D], ``length`` valid."""

    def __init__(self, host: HostKV) -> None:
        super().__init__()
        self.host = host

    @property
    def capacity(self) -> int:
        return 0 if self.k_buf is None else self.k_buf.shape[2]

    def capacity_for(self, needed: int, headroom: int) -> int:
        """Positions of the region that replaces this one when ``needed`` exceeds its capacity."""
        cap = round_up_positions(needed + headroom)
        if self.capacity:
            cap = max(cap, round_up_positions(self.capacity + _HOST_GROWTH_MIN))
        return cap

    cpu_readable = True  # the CPU can attend its K, V where they are (host_attention.py)

    def region_bytes(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, positions: int) -> int:
        """Host bytes of K and V regions for ``positions`` positions."""
        return 2 * batch * n_kv * positions * head_dim * torch.empty((), dtype=dtype).element_size()

    nbytes = KVBuffers.nbytes  # the same K, V buffers' bytes, here in host memory
    band = KVBuffers.band      # K, V of positions [lo, hi) where they are

    def host_nbytes(self) -> int:
        """Of nbytes(), those in host memory (the rest on the device)."""
        return self.nbytes()

    def new_region(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, needed: int,
                   headroom: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = [batch, n_kv, self.capacity_for(needed, headroom), head_dim]
        return self.host.arena.allocate(shape, dtype), self.host.arena.allocate(shape, dtype)

    def fetch(self, dst: KVBuffers, lo: int, n: int) -> int:
        """Copy positions [lo, n) into the staging buffers dst; returns the ticket to wait for."""
        engine = self.host.engine
        engine.prefetch(self.k_buf, dst.k_buf, lo, n)
        return engine.prefetch(self.v_buf, dst.v_buf, lo, n)

    def send(self, src: KVBuffers, lo: int, end: int, headroom: int) -> int:
        """Keep positions [lo, end) of the staging buffers src (growing the region first when short:
        then the whole layer [0, end) goes, its prefix having come from the old region); returns the
        ticket of the last copy that reads src (-1: none)."""
        if self.capacity < end:
            b, h, _, d = src.k_buf.shape
            self.k_buf, self.v_buf = self.new_region(b, h, d, src.k_buf.dtype, end, headroom)
            self.is_initialized = True
            lo = 0
        if end <= lo:
            return -1
        self.host.engine.offload(src.k_buf, self.k_buf, lo, end)
        return self.host.engine.offload(src.v_buf, self.v_buf, lo, end)

    def lazy_initialization(self, key_states, value_states) -> None:
        raise NotImplementedError("a host-resident KV layer is only written by chunkinfer's layer loop")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "a host-resident KV layer is only written by chunkinfer's layer loop; the stock transformers "
            "forward cannot run on a cache with offloaded layers")

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("beam search / batch reordering is not supported on host-resident KV")

    reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


class EncodedKVLayer(HostKVLayer):
    """A streamed layer whose K, V are held by the lossless codec (encoded.py), bit for bit: in host
    memory, or (``device``) encoded in the device's memory, expanded into the staging slot there."""

    def __init__(self, host: HostKV, device: torch.device | None = None) -> None:
        super().__init__(host)
        self.device = device
        self.k_enc: EncodedKV | None = None
        self.v_enc: EncodedKV | None = None

    @property
    def cpu_readable(self) -> bool:
        return self.device is None

    @property
    def capacity(self) -> int:
        return 0 if self.k_enc is None else self.k_enc.capacity

    def region_bytes(self, batch: int, n_kv: int, head_dim: int, dtype: torch.dtype, positions: int) -> int:
        if self.device is not None:
            return 0  # no host memory
        if self.k_enc is None:  # not calibrated yet: the size the plan expects
            return math.ceil(super().region_bytes(batch, n_kv, head_dim, dtype, positions) / self.host.planned_ratio)
        return self.k_enc.region_bytes(batch, n_kv, positions) + self.v_enc.region_bytes(batch, n_kv, positions)

    def nbytes(self) -> int:
        return 0 if self.k_enc is None else self.k_enc.nbytes() + self.v_enc.nbytes()

    def host_nbytes(self) -> int:
        return self.nbytes() if self.device is None else 0

    def held_shape(self) -> tuple[int, int, int, torch.dtype] | None:
        if self.k_enc is None or not self.length:
            return None
        b, h = self.k_enc.blocks.shape[:2]
        return b, h, self.k_enc.layout.head_dim, self.k_enc.layout.dtype

    def band(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of positions [lo, hi), decoded where the blocks are."""
        return self.k_enc.decoded(hi, lo), self.v_enc.decoded(hi, lo)

    def fetch(self, dst: KVBuffers, lo: int, n: int) -> "int | torch.cuda.Event":
        if dst.k_buf.device.type != "cuda":
            self.k_enc.expand(dst.k_buf, lo, n)  # synchronous: nothing to wait for
            self.v_enc.expand(dst.v_buf, lo, n)
            return -1
        # on the codec stream, after what the compute stream has queued (the slot's previous layer), so
        # that the copies and decodes overlap the compute queued next; the event orders the layer after
        compute = torch.cuda.current_stream(dst.k_buf.device)
        stream = self.host.codec_stream()
        stream.wait_stream(compute)
        for buf in (dst.k_buf, dst.v_buf):
            buf.record_stream(stream)  # not reused by the allocator before the codec stream is done with it
        with torch.cuda.stream(stream):
            self.k_enc.expand(dst.k_buf, lo, n)
            self.v_enc.expand(dst.v_buf, lo, n)
            return stream.record_event()

    def send(self, src: KVBuffers, lo: int, end: int, headroom: int) -> int:
        settings = self.host.compression
        b, h = src.k_buf.shape[:2]
        if self.capacity < end:
            # the slot holds [0, end): all of it goes to new blocks (tables chosen again when the first
            # ones saw fewer rows than a calibration takes), which replace the old ones only once written,
            # so a failure here leaves the layer as it was
            k, v = self.k_enc, self.v_enc
            if k is None or k.sample_rows < min(end, settings.calibration_rows):
                k = calibrated(self.host, src.k_buf, end, settings, self.device)
                v = calibrated(self.host, src.v_buf, end, settings, self.device)
            else:
                k, v = k.emptied(), v.emptied()
            cap = self.capacity_for(end, headroom)
            for enc, x in ((k, src.k_buf), (v, src.v_buf)):
                enc.reserve(b, h, cap, 0)
                enc.store(x, 0, end)
            self.k_enc, self.v_enc = k, v
            self.is_initialized = True
        elif end > lo:
            self.k_enc.store(src.k_buf, lo, end)
            self.v_enc.store(src.v_buf, lo, end)
        return -1

    def codec_report(self, index: int) -> LayerCodecReport | None:
        if self.k_enc is None or not self.length:
            return None
        return LayerCodecReport(index, self.k_enc.stats(self.length), self.v_enc.stats(self.length),
                                self.k_enc.pool.numel() + self.v_enc.pool.numel())


def move_to_host(cache, n_resident: int, on_device: int = 0) -> None:
    """Keep a cache's layers [0, n_resident) on the device and stream the rest: with compression, the
    full-attention ones among the next ``on_device`` layers encoded in the device's memory, the others
    in pinned host memory (a streamed layer stays where it is; a sliding-window layer's ring, bounded by
    its window, stays resident). Moving a filled layer copies it and waits for the copy."""
    if cache.host is None:
        raise RuntimeError("this cache was not created for KV offload (convert(model, kv_offload=True))")
    host = cache.host
    for i in range(n_resident, len(cache.layers)):
        old = cache.layers[i]
        if isinstance(old, ChunkKVLayer) and old.window is None:  # rings stay: a window is small
            new = host.new_layer(on_device=i < n_resident + on_device)
            if old.length:
                new.send(old, 0, old.length, 0)
                host.engine.synchronize()
                new.length, new.is_initialized = old.length, True
            cache.layers[i] = new
    if n_resident < len(cache.layers):
        if cache.staging is None:
            cache.staging = Staging()
        cache.staging.use(1 if on_device else 2)


@dataclass
class _Slot:
    kv: KVBuffers = field(default_factory=KVBuffers)
    offload_ticket: int = -1   # the last offload that reads this slot


@dataclass
class Staging:
    """The GPU slots streamed layers use in turn, kept with the cache between calls: two, so that one is
    filled (from the host, or the CPU attends its layer's share) while the other computes and drains; one
    where memory is what limits, when layers are kept encoded on the device (each layer then finishes
    before the next begins: no overlap, a whole layer's raw K, V less)."""

    slots: list = field(default_factory=lambda: [_Slot(), _Slot()])

    def use(self, n: int) -> None:
        """Keep n slots (1 or 2): a slot dropped frees its buffers."""
        self.slots = self.slots[:n] + [_Slot() for _ in range(n - len(self.slots))]

    def nbytes(self) -> int:
        return sum(s.kv.nbytes() for s in self.slots)


class LayerStreamer:
    """Streams the host-resident layers of one forward call through the staging slots.

    ``begin(li)`` returns the K, V buffers layer ``li`` computes with (prefix already there, or in
    flight and waited for on the compute stream); ``finish(li)`` sends positions [start, end) back.
    """

    def __init__(self, host: HostKV, staging: Staging, layers: list, streamed: list[int], start: int,
                 end: int, headroom: int, shape_of, cpu_keys: dict[int, int] | None = None):
        self.host, self.engine, self.staging = host, host.engine, staging
        self.layers, self.streamed, self.start, self.end, self.headroom = layers, streamed, start, end, headroom
        self.shape_of = shape_of            # li -> (batch, n_kv, head_dim, dtype)
        self.turn = {li: i % len(staging.slots) for i, li in enumerate(streamed)}
        self.prefetched: dict[int, int] = {}  # li -> ticket of its prefix prefetch, issued ahead
        self.cpu_keys = cpu_keys or {}      # li -> positions [0, n) the CPU attends (not prefetched)

    @classmethod
    def for_call(cls, cache, shape_of, start: int, end: int, headroom: int, attends_all=lambda li: True,
                 step: bool = False) -> "LayerStreamer | None":
        """The streamer of one call over ``cache``, or None when every layer is resident. Starts
        pinning the host memory the call will need on the arena's thread, overlapped with compute.
        A ``step`` (a few new tokens on the decode kernels) leaves the first positions of each layer that
        ``attends_all`` (no sliding window) to the CPU (host_attention.py), unless a host region must
        grow this call."""
        streamed = cache.streamed_layers()
        if not streamed:
            return None
        host = cache.host
        need, region = 0, 0
        for li in streamed:
            layer = cache.layers[li]
            if layer.capacity < end:
                nbytes = layer.region_bytes(*shape_of(li), layer.capacity_for(end, headroom))
                need += nbytes
                region = max(region, nbytes // 2)
        if need:  # pinning is slow (~2.6 GiB/s): start it now, on the arena's thread
            host.arena.grow_async(host.arena.bytes_used + need, region)
        cpu_keys = {}
        if host.cpu_share is not None and step and not need:
            n_cpu = host.cpu_share.cpu_positions(start)
            cpu_keys = {li: n_cpu for li in streamed
                        if n_cpu > 0 and attends_all(li) and cache.layers[li].cpu_readable}
            if cpu_keys:
                host.engine.synchronize()  # the CPU reads host K, V: earlier offloads must have landed
        return cls(host, cache.staging, cache.layers, streamed, start, end, headroom, shape_of, cpu_keys)

    def _wait(self, ticket: "int | torch.cuda.Event") -> None:
        """Order the current stream after a copy: an engine ticket, or an encoded layer's expand event."""
        if isinstance(ticket, torch.cuda.Event):
            torch.cuda.current_stream().wait_event(ticket)
        elif ticket >= 0:
            self.engine.wait(ticket)

    def is_streamed(self, li: int) -> bool:
        return li in self.turn

    def _slot(self, li: int) -> _Slot:
        slot = self.staging.slots[self.turn[li]]
        b, h, d, dtype = self.shape_of(li)
        if slot.kv.k_buf is not None and slot.kv.k_buf.shape[2] < self.end:
            self._wait(slot.offload_ticket)  # the old slot may still be draining to the host
        slot.kv.reserve(b, h, d, dtype, self.host.device, self.end, self.headroom)
        return slot

    def _prefetch(self, li: int) -> None:
        layer = self.layers[li]
        n = min(self.start, layer.length)
        lo = min(self.cpu_keys.get(li, 0), n)  # positions before lo are attended on the CPU
        if n == lo:
            return
        slot = self._slot(li)
        self._wait(slot.offload_ticket)  # positions the last offload reads may be overwritten
        self.prefetched[li] = layer.fetch(slot.kv, lo, n)

    def begin(self, li: int) -> KVBuffers:
        if li not in self.prefetched:
            self._prefetch(li)
        slot = self._slot(li)
        ticket = self.prefetched.pop(li, None)
        if ticket is None:
            self._wait(slot.offload_ticket)
        else:
            self._wait(ticket)
        nxt = self.streamed.index(li) + 1
        if nxt < len(self.streamed) and self.turn[self.streamed[nxt]] != self.turn[li]:
            self._prefetch(self.streamed[nxt])  # overlaps this layer's compute
        return slot.kv

    def finish(self, li: int) -> None:
        layer: HostKVLayer = self.layers[li]
        slot = self.staging.slots[self.turn[li]]
        ticket = layer.send(slot.kv, self.start, self.end, self.headroom)
        if ticket >= 0:
            slot.offload_ticket = ticket

    def close(self, failed: bool) -> None:
        """After the loop. On failure, wait for every copy so nothing in flight outlives the call."""
        if failed:
            self.engine.synchronize()
