"""plan(): will a call fit, where will its KV live, with which chunk sizes, and about how long will it take?

It combines the planner's parts: the model's shape (shape.py, from the adapters), what the loop allocates
(memory.py), the chunk schedule that keeps the peak under the budget (schedule.py) and the time model
fitted to measurements (rates.py). On the CPU (``device="cpu"``) it predicts the process's peak resident
set size (RSS): the process baseline (a fresh interpreter with torch, transformers, chunkinfer and the
model's modeling code imported, measured once per process by starting one; or ``process_baseline``) +
weights + the loop's allocations + the CPU calibration. Times are not predicted there (no CPU rates).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..kv.device_layer import PREFILL_HEADROOM, capacity_for
from ..kv.transfer import available as offload_engine_available
from ..loop.head import head_chunk_rows
from ..kv.ring import held_capacity, ring_capacity
from .memory import (CPU_CALIBRATION, CUDA_CALIBRATION, HOST_USABLE, Calibration, decode_growth, kv_capacity,
                     ring_extra_positions, slack, work_bytes)
from .rates import (H200_ATTENTION_FLOPS, H200_DECODE_BYTES_PER_S, H200_DECODE_STEP_MS, H200_H2D_BYTES_PER_S,
                    H200_LINEAR_FLOPS, H200_SPLIT_CPU_BYTES_PER_S, RATES_FROM, decode_bytes, prefill_flops)
from .schedule import CHUNK_LIMITS, CallMemory, ChunkWork, chunk_candidates, choose, describe
from .shape import Shape, load_config
from .units import GiB, device_kind, dtype_name, parse_dtype, parse_memory, positive_int


@dataclass
class Plan:
    model_type: str
    seq_len: int
    batch: int
    dtype: str
    chunk_size: int | None                 # the smallest chunk of the schedule; None: no chunk size fits
    breakdown_chunk: int                   # the breakdown's chunk when none fits
    kv_capacity: int                       # positions per layer buffer
    resident_layers: list[int]             # layers whose K, V stay on the device
    host_layers: list[int]                 # layers whose K, V would live in pinned host memory
    device_breakdown: dict[str, int]       # predicted peak device bytes (on the CPU: peak RSS) by part
    host_breakdown: dict[str, int]         # predicted host bytes by part (CUDA only)
    device_memory: int
    host_memory: int
    prefill_seconds: float | None          # None on the CPU (no CPU rates measured)
    decode_ms_per_token: float | None
    decode_seconds: float | None
    fits: bool
    reason: str
    offload_available: bool = True         # the host-offload engine is built into this install
    allow_offload: bool = True
    rates_from: str = RATES_FROM
    notes: list[str] = field(default_factory=list)
    chunk_schedule: list[int] | None = None  # per layer, non-increasing; None when nothing fits
    peak_layer: int = 0                    # the layer where the predicted peak occurs
    device: str = "cuda"                   # "cuda" or "cpu"
    past: int = 0                          # positions cached before the call (a continuation)
    calibration: Calibration = CUDA_CALIBRATION
    shape_bytes: int = 0                   # the loop's allocations at the peak from the shapes alone
    kv_compression_ratio: float | None = None  # host KV stored losslessly compressed at this ratio; None: raw
    encoded_device_layers: list[int] = field(default_factory=list)  # KV kept encoded in device memory

    @property
    def device_bytes(self) -> int:
        return sum(self.device_breakdown.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host_breakdown.values())

    @property
    def peak_alloc_beyond_weights(self) -> int:
        """What torch.cuda.max_memory_allocated() - weights should read after the run; on the CPU,
        the peak RSS less the process baseline and the weights."""
        skip = {"weights", "allocator margin", "process baseline"}
        return sum(v for k, v in self.device_breakdown.items() if k not in skip)

    def chunks_text(self) -> str:
        if self.chunk_schedule is None:
            return f"no chunk size fits (shown: chunk {self.breakdown_chunk})"
        if len(set(self.chunk_schedule)) == 1:
            return f"chunk size {self.chunk_size}"
        return f"chunk sizes {describe(self.chunk_schedule)}"

    def table(self) -> str:
        def g(n: int) -> str:
            return f"{n / GiB:10.2f}"

        cpu = self.device == "cpu"
        after = f" after {self.past:,} cached" if self.past else ""
        head = (f"chunkinfer plan: {self.model_type}, {self.seq_len:,} tokens{after} x batch {self.batch}, "
                f"{self.dtype}" + (" on the CPU" if cpu else ""))
        where = (f"KV layers {len(self.resident_layers)} in process memory" if cpu else
                 f"KV layers resident {len(self.resident_layers)}, "
                 + (f"encoded on device {len(self.encoded_device_layers)}, " if self.encoded_device_layers else "")
                 + f"on host {len(self.host_layers)}")
        ratio = self.kv_compression_ratio
        if ratio is not None and not cpu:
            where += f" (host KV compressed, ratio {ratio:.2f})"
        lines = [head, f"{self.chunks_text()}, KV capacity {self.kv_capacity:,} positions/layer, {where}", "",
                 f"{'process (peak RSS)' if cpu else 'device (peak)':<34}{'GiB':>10}"]
        lines += [f"  {k:<32}{g(v)}" for k, v in self.device_breakdown.items()]
        lines += [f"  {'total':<32}{g(self.device_bytes)}", f"  {'available':<32}{g(self.device_memory)}", ""]
        if not cpu:
            lines += [f"{'host':<34}{'GiB':>10}"]
            # the key stays "KV on host" (code reads it); only the printed label says it is compressed
            label = {"KV on host": f"KV on host (compressed {ratio:.2f}x)"} if ratio is not None else {}
            lines += [f"  {label.get(k, k):<32}{g(v)}" for k, v in self.host_breakdown.items()]
            lines += [f"  {'total':<32}{g(self.host_bytes)}", f"  {'available':<32}{g(self.host_memory)}", ""]
        if self.prefill_seconds is None:
            lines += ["times: not predicted on the CPU (no CPU rates measured)", ""]
        else:
            lines += [f"prefill   {self.prefill_seconds:10.2f} s",
                      f"decode    {self.decode_ms_per_token:10.2f} ms/token"
                      + (f" ({self.decode_seconds:.2f} s in all)" if self.decode_seconds else ""),
                      f"(times: {self.rates_from})", ""]
        lines += [f"fits: {'yes' if self.fits else 'no'}" + ("" if self.fits else f": {self.reason}")]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _default_device_memory() -> int:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device to read the memory size from; pass device_memory "
                           "(bytes or a string such as '80GiB')")
    return torch.cuda.mem_get_info()[1]


def _default_host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError) as exc:
        raise RuntimeError("cannot read the host memory size; pass host_memory") from exc


def _process_baseline(value, kind: str, model_type: str) -> int:
    if kind != "cpu":
        if value is not None:
            raise ValueError("process_baseline is part of the CPU prediction (device='cpu')")
        return 0
    if value is None:
        from .rss import fresh_process_baseline

        return fresh_process_baseline("gemma3_text" if model_type == "gemma3" else model_type)
    return positive_int(value, "process_baseline", minimum=0)


# the codec's worst case: a block's slot and its spilled exponent plane, under 1.5x the raw bytes (fp16), so
# a measured ratio below 1 (data that codes badly) is planned as it is, never rounded up to raw
MIN_COMPRESSION_RATIO = 0.5


def _compression_ratio(value) -> float | None:
    """kv_compression_ratio checked: None, or a finite int/float >= MIN_COMPRESSION_RATIO (as a float)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"kv_compression_ratio must be a float >= {MIN_COMPRESSION_RATIO} or None, got "
                        f"{type(value).__name__} {value!r}")
    ratio = float(value)
    if not math.isfinite(ratio) or ratio < MIN_COMPRESSION_RATIO:  # NaN compares false: checked apart
        raise ValueError(f"kv_compression_ratio must be a finite number >= {MIN_COMPRESSION_RATIO}, got {value!r}")
    return ratio


def _dev_span(full: list[bool], n_resident: int, n_full: int) -> int:
    """Layers from n_resident on that hold its first n_full full-attention layers (rings in between)."""
    seen = 0
    for i in range(n_resident, len(full)):
        if seen == n_full:
            return i - n_resident
        seen += full[i]
    return len(full) - n_resident


def _compressed(n_bytes: int, ratio: float | None) -> int:
    """ceil(n_bytes / ratio) in exact integer arithmetic (the float ratio as its exact fraction); raw for None."""
    if ratio is None:
        return n_bytes
    num, den = ratio.as_integer_ratio()
    return -(-n_bytes * den // num)


def plan(config, seq_len: int, *, batch: int = 1, dtype=torch.bfloat16, device_memory=None, host_memory=None,
         decode_tokens: int = 0, chunk_size: int | None = None, allow_offload: bool = True,
         resident_layers: int | None = None, device="cuda", past: int = 0, past_capacity: int | None = None,
         process_baseline: int | None = None, calibration: Calibration | None = None,
         last_layer_block: bool = False, logits_rows: int = 1, cpu_attention: bool = True,
         log_probs: bool = False, kv_compression_ratio: float | None = None) -> Plan:
    """Predict device / host memory, chunk sizes and times of a prefill of ``seq_len`` tokens (plus
    ``decode_tokens`` generated ones) with chunkinfer. Memories: bytes or strings like "139GiB".

    Chunks: per layer the largest power of two in the device's ``CHUNK_LIMITS`` whose peak fits,
    non-increasing as the KV grows (``Plan.chunk_schedule``; ``Plan.chunk_size`` is its smallest);
    ``chunk_size`` fixes one chunk for every layer instead. The prefill is generate()'s (logits of
    the last position); ``last_layer_block``: the last layer computes every row (loss, hidden states);
    ``logits_rows``: rows of logits the call returns (a model(ids) call: all of them); ``log_probs``: the
    call ends in token log-probabilities (``token_logprobs``): each head chunk's logits again in fp32 and
    their log-softmax, and the [B, S] fp32 result.

    KV placement: every layer resident when that fits; else, with ``allow_offload``, the first layers
    resident and the rest in pinned host memory, as many resident as fit. ``resident_layers`` fixes
    that count instead (the chunk must then fit with it).

    ``past``: positions already cached (a continuation), in buffers of ``past_capacity`` positions
    (default: as a prefill of ``past`` tokens leaves them). ``calibration``: a measured correction
    (calibrate.py); default ``CUDA_CALIBRATION`` / ``CPU_CALIBRATION``. ``cpu_attention``: decode
    steps attend part of the host KV on the CPU (convert's default), else they stream all of it.

    ``kv_compression_ratio``: None (default) keeps host-resident KV raw. A float r (raw / stored, at
    least MIN_COMPRESSION_RATIO) plans streamed KV stored with lossless compression: each host layer's K, V
    take ceil(layer bytes / r) of pinned host memory and cross PCIe compressed in decode; the device
    staging slots stay raw (they hold the expanded K, V). When the host cannot hold the rest (r > 1),
    layers are kept encoded in device memory too (``Plan.encoded_device_layers``, ceil(layer bytes / r)
    each, given up raw-resident layers for), with one staging slot. Pass an already-margined ratio, the
    measured one divided by (1 + safety margin): the plan takes r as given.

    ``device="cpu"``: predicts the process's peak RSS. ``device_memory`` is then the RSS the process
    may reach (default: physical memory), nothing is offloaded, and ``process_baseline`` is the RSS
    before the weights (default: measured in a fresh interpreter, see rss.fresh_process_baseline)."""
    seq_len = positive_int(seq_len, "seq_len")
    batch = positive_int(batch, "batch")
    decode_tokens = positive_int(decode_tokens, "decode_tokens", minimum=0)
    past = positive_int(past, "past", minimum=0)
    logits_rows = positive_int(logits_rows, "logits_rows", minimum=0)
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    if not isinstance(allow_offload, bool):
        raise TypeError(f"allow_offload must be a bool, got {type(allow_offload).__name__}")
    if not isinstance(cpu_attention, bool):
        raise TypeError(f"cpu_attention must be a bool, got {type(cpu_attention).__name__}")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a chunkinfer Calibration, got {type(calibration).__name__}")
    kind = device_kind(device)
    cpu = kind == "cpu"
    ratio = _compression_ratio(kv_compression_ratio)
    if ratio is not None and cpu:
        raise ValueError("kv_compression_ratio compresses KV offloaded to host memory: not a CPU plan's choice")
    offload_available = offload_engine_available() and not cpu
    allow_offload = allow_offload and offload_available
    dt = parse_dtype(dtype)
    elt = torch.empty((), dtype=dt).element_size()
    config = load_config(config)
    shape = Shape.from_config(config)
    L = shape.layers
    if past_capacity is None:
        past_capacity = kv_capacity(past)[0] if past else 0
    past_capacity = positive_int(past_capacity, "past_capacity", minimum=0)
    if past and past_capacity < past:
        raise ValueError(f"past_capacity ({past_capacity}) must hold the {past} cached positions")
    if resident_layers is not None:
        resident_layers = positive_int(resident_layers, "resident_layers", minimum=0)
        if resident_layers > L:
            raise ValueError(f"resident_layers must be <= the model's {L} layers, got {resident_layers}")
        if resident_layers < L and cpu:
            raise ValueError("resident_layers < layers offloads KV to host memory: not a CPU plan's choice")
        if resident_layers < L and not offload_engine_available():
            raise ValueError("resident_layers < layers needs the KV offload engine, which this build lacks")
    baseline = _process_baseline(process_baseline, kind, shape.model_type)
    if device_memory is not None:
        dev = parse_memory(device_memory, "device_memory")
    else:
        dev = _default_host_memory() if cpu else _default_device_memory()
    host = parse_memory(host_memory, "host_memory") if host_memory is not None else _default_host_memory()
    cal = calibration or (CPU_CALIBRATION if cpu else CUDA_CALIBRATION)

    weights = shape.weight_params() * elt
    residual = batch * seq_len * shape.hidden * elt + 2 * batch * seq_len * 8  # + int64 ids, positions
    end = past + seq_len
    per_position = batch * shape.kv_bytes_per_token_layer(elt)
    call_cap = capacity_for(past_capacity, end, PREFILL_HEADROOM if seq_len > 1 else 0)
    cap, prev_cap = decode_growth(call_cap, end + decode_tokens)
    layer_kv = per_position * cap
    windows = shape.windows
    full = [w is None for w in windows]
    growth_kv = per_position * prev_cap if cap != prev_cap and any(full) else 0
    # a sliding-window layer keeps a ring of its window, on the device whatever the placement (kv/ring.py)
    final = end + decode_tokens
    ring_kv = [0 if w is None else per_position * (ring_capacity(w, final, 1) if decode_tokens else held_capacity(w, end))
               for w in windows]
    ring_old = [0 if w is None else per_position * held_capacity(w, past) for w in windows]
    works: dict[int, ChunkWork] = {}

    def work_of(c: int) -> ChunkWork:
        if c not in works:
            w = work_bytes(shape, min(c, seq_len), batch, elt)
            ring_extra = per_position * ring_extra_positions(shape, end, min(c, seq_len))  # while its layer runs
            works[c] = ChunkWork(w.activation + ring_extra, w.block, w.kv_only)
        return works[c]

    def host_count(n_resident: int, n_dev: int = 0) -> int:
        return sum(full[n_resident + n_dev:])

    encoded_kv = _compressed(layer_kv, ratio)

    def staging_bytes(n_streamed: int, n_dev: int = 0) -> int:
        # offload: two layers' K, V staged on the device (the one computed, the one filled or draining);
        # one when layers are kept encoded on the device (memory is what limits: kv/offload.py Staging)
        return min(1 if n_dev else 2, n_streamed) * layer_kv
    encoded_past = _compressed(per_position * past_capacity, ratio)

    # the LM head after the loop: the returned logits and one head chunk's normed rows and logits
    head_rows = head_chunk_rows(seq_len, shape.vocab)  # at most: the loop's chunk caps it too
    logits = batch * (logits_rows * shape.vocab + head_rows * (shape.vocab + shape.hidden)) * elt
    if log_probs:
        logits += batch * (2 * head_rows * shape.vocab + seq_len) * 4

    def memory(n_resident: int, n_dev: int = 0) -> CallMemory:
        """Layers [0, n_resident) resident raw, the full ones of [n_resident, n_resident + n_dev) kept
        encoded on the device (compression), the other full ones on the host."""
        staging = staging_bytes(host_count(n_resident), n_dev)

        def kv(i: int, old: bool) -> int:
            if not full[i]:
                return ring_old[i] if old else ring_kv[i]
            if i < n_resident:
                return per_position * past_capacity if old else layer_kv
            if i < n_resident + n_dev:
                return encoded_past if old else encoded_kv
            return 0

        kv_old = [kv(i, True) for i in range(L)]
        kv_new = [kv(i, False) for i in range(L)]
        return CallMemory(kv_old=kv_old, kv_new=kv_new, fixed=residual + staging + growth_kv,
                          work=work_of, last_layer_block=last_layer_block,
                          tail=logits if logits_rows > 1 or log_probs else 0)

    def total(alloc: int) -> int:
        over = cal.overhead(alloc)
        return baseline + weights + alloc + over + (0 if cpu else slack(alloc + over))

    def fits(alloc: int) -> bool:
        return total(alloc) <= dev

    def schedule(n_resident: int, cands: list[int], n_dev: int = 0) -> list[int] | None:
        return choose(memory(n_resident, n_dev), cands, fits)

    def parts_of(n_resident: int, chunks: list[int], n_dev: int = 0) -> tuple[dict, int, int]:
        n_streamed = host_count(n_resident)  # on the host and encoded on the device alike
        mem = memory(n_resident, n_dev)
        alloc, layer = mem.peak(chunks)
        staging = staging_bytes(n_streamed, n_dev)
        encoded = sum(mem.kv_new[i] for i in range(n_resident, n_resident + n_dev) if full[i])  # rings: resident
        kv = sum(mem.kv_new) + growth_kv - encoded
        parts = {"process baseline": baseline} if cpu else {}
        parts |= {"weights": weights, "residual stream": residual, ("KV cache" if cpu else "KV resident"): kv}
        if encoded:
            parts["KV encoded on device"] = encoded
        if n_streamed:
            parts["KV offload staging"] = staging
        parts["chunk work buffers"] = alloc - residual - staging - kv - encoded  # net of KV not yet allocated then
        over = cal.overhead(alloc)
        if cpu:
            parts["runtime and malloc overhead"] = over
        else:
            parts["runtime fixed"] = over
            parts["allocator margin"] = slack(alloc + over)
        return parts, layer, alloc

    limits = CHUNK_LIMITS[kind]
    candidates = [chunk_size] if chunk_size is not None else chunk_candidates(seq_len, limits.cap, limits.floor)
    offload_cands = candidates if chunk_size is not None else (
        [c for c in candidates if c <= limits.offload_cap] or candidates[-1:])
    notes: list[str] = []
    n_resident = L if resident_layers is None else resident_layers
    chunks = schedule(n_resident, candidates if n_resident == L else offload_cands)
    if chunks is None and resident_layers is None and allow_offload:
        # the largest chunk that fits with every layer streamed, then as many resident layers as fit with it
        streamed = schedule(0, offload_cands)
        if streamed is not None:
            keep = [c for c in offload_cands if c >= min(streamed)]
            n_resident, chunks = 0, streamed
            while n_resident + 1 < L and (more := schedule(n_resident + 1, keep)) is not None:
                n_resident, chunks = n_resident + 1, more
        else:
            n_resident = 0
    host_usable = int(host * HOST_USABLE)

    def host_fits(n_raw: int, n_dev: int) -> bool:
        n = host_count(n_raw, n_dev)
        return not n or n * encoded_kv + GiB <= host_usable

    n_dev = 0
    if ratio is not None and ratio > 1.0 and allow_offload and chunks is not None and not host_fits(n_resident, 0):
        # compressed KV fits the device too: from the most raw-resident layers down, as many layers
        # encoded on the device as the chunk schedule leaves room for, until the rest fit the host
        closest = (n_resident, 0, chunks)
        for n_raw in range(n_resident, -1, -1):
            most = host_count(n_raw)
            lo, hi, best = 0, most, schedule(n_raw, offload_cands)
            if best is None:
                continue
            while lo < hi:  # the largest n_dev whose schedule fits (device bytes grow with it)
                mid = (lo + hi + 1) // 2
                if (sched := schedule(n_raw, offload_cands, _dev_span(full, n_raw, mid))) is not None:
                    lo, best = mid, sched
                else:
                    hi = mid - 1
            span = _dev_span(full, n_raw, lo)
            closest = (n_raw, span, best)  # with n_raw = 0 at the end: the most the device can take
            if host_fits(n_raw, span) or resident_layers is not None:
                break
        n_resident, n_dev, chunks = closest  # when nothing fits the host: the closest, for the report
    report_chunk = min(chunks) if chunks is not None else candidates[-1]
    peak_chunks = chunks if chunks is not None else [report_chunk] * L
    parts, peak_layer, shape_bytes = parts_of(n_resident, peak_chunks, n_dev)
    n_host = host_count(n_resident, n_dev)
    # compressed per layer: each host layer's K, V is its own region of the arena
    host_kv = n_host * encoded_kv
    # the arena hands out exact regions from 1 GiB slabs: at most one slab's tail is unused
    host_parts = {} if cpu else {"KV on host": host_kv, "pinned arena slab tail": GiB if n_host else 0}

    need_dev = sum(parts.values())
    reason = ""
    if chunks is None:
        what = f"chunk {candidates[0]}" if chunk_size is not None else f"the smallest chunk ({candidates[-1]})"
        mem = "the process" if cpu else "device"
        tail = f"only {dev:,} bytes ({dev / GiB:.2f} GiB) are available"
        if cpu:
            reason = f"{mem} needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) of RSS with {what}, but {tail}"
        elif resident_layers is not None:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} and {n_resident} "
                      f"layers' KV resident, but {tail}")
        elif allow_offload:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} even with every "
                      f"layer's KV on the host, but {tail}")
        else:
            reason = (f"device needs {need_dev:,} bytes ({need_dev / GiB:.2f} GiB) with {what} and every layer's "
                      f"KV resident, but {tail}")
            alt = plan(config, seq_len, batch=batch, dtype=dt, device_memory=dev, host_memory=host,
                       decode_tokens=decode_tokens, chunk_size=chunk_size, past=past, past_capacity=past_capacity,
                       calibration=calibration, last_layer_block=last_layer_block, logits_rows=logits_rows,
                       log_probs=log_probs, kv_compression_ratio=ratio) if offload_available else None
            if alt is None:
                reason += "; this build has no KV offload engine"
            elif alt.fits:
                reason += (f"; with KV offload (allow_offload=True) {len(alt.host_layers)} of {L} layers' KV would "
                           "go to pinned host memory and it fits")
            else:
                reason += "; KV offload would not fit either"
    elif n_host and sum(host_parts.values()) > host_usable:
        hb = sum(host_parts.values())
        packed = f", compressed at ratio {ratio:.2f}" if ratio is not None else ""
        held = f"{n_resident} raw and {sum(full[n_resident:n_resident + n_dev])} encoded" if n_dev else f"{n_resident}"
        reason = (f"host needs {hb:,} bytes ({hb / GiB:.2f} GiB) for {n_host} layers' KV{packed} (the device holds "
                  f"{held} of {L} layers), but only "
                  f"{host_usable:,} bytes ({host_usable / GiB:.2f} GiB, {HOST_USABLE:.0%} of {host / GiB:.2f} GiB) "
                  "are usable")
    fits_all = not reason
    dev_layers = [i for i in range(n_resident, n_resident + n_dev) if full[i]]
    if fits_all and dev_layers:
        notes.append(f"{len(dev_layers)} full-attention layers from layer {n_resident} on keep their KV encoded in "
                     f"device memory ({encoded_kv / GiB:.2f} GiB a layer instead of {layer_kv / GiB:.2f}), expanded "
                     "into the staging slot when they run")
    if fits_all and n_host:
        notes.append(f"{n_host} full-attention layers from layer {n_resident + n_dev} on keep their KV in pinned host memory "
                     "(kv_offload=True); "
                     + ("each decode step attends part of it on the CPU and streams the rest to the device"
                        if cpu_attention else "each decode step streams it to the device once"))
    if ratio is not None:
        if n_host:
            raw = n_host * layer_kv
            notes.append(f"host KV stored with lossless compression at the planned ratio {ratio:.2f} "
                         f"(kv_compression_ratio, taken as already margined): {host_kv / GiB:.2f} GiB instead of "
                         f"{raw / GiB:.2f} GiB raw; the device staging slots hold it expanded")
        else:
            notes.append(f"kv_compression_ratio {ratio:.2f} changes nothing here: no layer's KV is on the host")
    if chunks is not None and len(set(chunks)) > 1:
        notes.append("the chunk shrinks layer by layer as the KV grows (peak at layer "
                     f"{peak_layer}); convert() with chunk_size=None runs this schedule")
    if cpu:
        notes.append("peak RSS = process baseline (" + ("given" if process_baseline is not None else
                     "a fresh interpreter with torch, transformers, chunkinfer and the modeling code imported")
                     + ") + weights + the loop's allocations; a model loader's own peak (e.g. GGUF dequantisation) "
                     "and anything else the process holds are not included")
    elif dt != torch.bfloat16:
        notes.append("times are bf16 measurements; other dtypes are not calibrated")
    if any(windows):
        rings = sorted({(w, ring_kv[i] // per_position) for i, w in enumerate(windows) if w})
        notes.append(f"{L - sum(full)} of {L} layers slide: each keeps a ring of its window ("
                     + ", ".join(f"window {w}: {n:,} positions" for w, n in rings)
                     + f"), plus one chunk's positions while its layer runs; {sum(full)} full-attention layers "
                     f"hold {cap:,}")

    prefill_s = per_tok = decode_s = None
    if not cpu:
        lin, att = prefill_flops(shape, seq_len, batch, past)
        prefill_s = lin / H200_LINEAR_FLOPS + att / H200_ATTENTION_FLOPS
        mean = end + decode_tokens // 2
        length = int(end + decode_tokens / 2) if decode_tokens else end
        per_tok = decode_bytes(shape, length, batch, elt) * 1e3 / H200_DECODE_BYTES_PER_S + H200_DECODE_STEP_MS
        # the host part crosses PCIe each step (or part of it is attended by the CPU meanwhile),
        # overlapped with the resident part's reads
        # Compressed host KV (kept simple): the streamed part crosses PCIe as bytes / r at the H2D rate, i.e.
        # raw bytes at r x H2D; the CPU's share reads at today's rate; decompression time is not modelled.
        host_rate = H200_H2D_BYTES_PER_S * (ratio or 1.0) + (H200_SPLIT_CPU_BYTES_PER_S if cpu_attention else 0.0)
        per_tok += n_host * batch * mean * shape.kv_bytes_per_token_layer(elt) * 1e3 / host_rate
        # a layer encoded on the device is expanded into the slot each step: its encoded bytes read and the
        # raw ones written, on top of the attention's read
        per_tok += (len(dev_layers) * batch * mean * shape.kv_bytes_per_token_layer(elt) * (1 + 1 / (ratio or 1.0))
                    * 1e3 / H200_DECODE_BYTES_PER_S)
        decode_s = per_tok * decode_tokens / 1e3
    return Plan(model_type=shape.model_type, seq_len=seq_len, batch=batch, dtype=dtype_name(dt),
                chunk_size=min(chunks) if chunks is not None else None, breakdown_chunk=report_chunk,
                kv_capacity=cap, resident_layers=[i for i in range(L) if i < n_resident or not full[i]],
                host_layers=[i for i in range(n_resident + n_dev, L) if full[i]], encoded_device_layers=dev_layers,
                device_breakdown=parts, host_breakdown=host_parts, device_memory=dev, host_memory=host,
                prefill_seconds=prefill_s, decode_ms_per_token=per_tok, decode_seconds=decode_s, fits=fits_all,
                reason=reason, allow_offload=allow_offload, offload_available=offload_available, notes=notes,
                chunk_schedule=chunks, peak_layer=peak_layer, device=kind, past=past, calibration=cal,
                shape_bytes=shape_bytes, kv_compression_ratio=ratio,
                rates_from="no CPU rates measured" if cpu else RATES_FROM)
