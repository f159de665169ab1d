// Every schema of the chunkinfer op library, in one place. Backends add kernels with
// TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cu, each through register_backend.h (which
// also derives every functional form from its `_out` op); fake (Meta) kernels live in ops.py.
// No Python here: the C++ tests link this file to call the ops through the dispatcher.
#include <torch/library.h>

TORCH_LIBRARY(chunkinfer, m) {
  // activation-and-multiply: x = gate | up, or gate = x and up given separately
  m.def("silu_and_mul(Tensor x, Tensor? up=None) -> Tensor");
  m.def("silu_and_mul_out(Tensor(a!) out, Tensor x, Tensor? up=None) -> ()");
  m.def("gelu_and_mul(Tensor x, Tensor? up=None, str approximate='none') -> Tensor");
  m.def("gelu_and_mul_out(Tensor(a!) out, Tensor x, Tensor? up=None, str approximate='none') -> ()");
  // RMSNorm with fp32 statistics; gemma=True scales by (1 + weight)
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool gemma=False) -> Tensor");
  m.def("rms_norm_out(Tensor(a!) out, Tensor x, Tensor weight, float eps, bool gemma=False) -> ()");
  // in place: residual += x; x = rms_norm(residual) * weight
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps, bool gemma=False) -> ()");
  // decode attention over a preallocated cache: q [B, Hq, T, D], k_cache/v_cache [B, Hkv, cap, D],
  // seq_lens/starts [B] int32 on q's device (read there, so one CUDA graph serves every length);
  // returns out [B, Hq, T, D] and lse [B, Hq, T] (fp32, natural log); window <= 0: none
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0, bool prefix_ready=False, int split_keys=0) -> (Tensor, Tensor)");
  m.def("decode_attention_out(Tensor(a!) out, Tensor(b!) lse, Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, Tensor? starts=None, float? scale=None, int window=0, bool prefix_ready=False, int split_keys=0) -> ()");
  m.def("decode_attention_kv_codec(Tensor q, Tensor k_blocks, Tensor k_spill, Tensor k_table, Tensor v_blocks, Tensor v_spill, Tensor v_table, Tensor seq_lens, Tensor? starts=None, float? scale=None, int block_rows=16, int k_escape_capacity=16, int v_escape_capacity=16, int split_keys=0) -> (Tensor, Tensor)");
  // exact merge of two partial attentions over disjoint keys: out [..., D], lse [...] (fp32)
  m.def("merge_attn_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor, Tensor)");
  m.def("merge_attn_states_out(Tensor(a!) out, Tensor(b!) lse, Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> ()");
  // rotary embedding of the new tokens' q (in place) and k, and k, v written into the cache at index[t]:
  // q [B, T, Hq, D] or None, k, v [B, T, Hkv, D], cos/sin [1 or B, T, R] (sin's first half negated),
  // k_cache/v_cache [B, Hkv, cap, D], index [T] int64 on the device (one CUDA graph serves every step)
  // decode-step projections of x [..., K] with 1-4 rows: the weights' outputs side by side (+ biases);
  // act(gate proj) * up proj. Each projection rounded as F.linear rounds it. Optional prologue: the
  // projections are of h = rms_norm(x (+ add)) (norm_weight given), residual_out = x (+ add)
  m.def("gemv(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? norm_weight=None, float eps=0.0, bool gemma=False, Tensor? add=None, Tensor(a!)? residual_out=None) -> Tensor");
  m.def("gemv_act_and_mul(Tensor x, Tensor gate, Tensor up, str activation, str approximate='none', Tensor? norm_weight=None, float eps=0.0, bool gemma=False, Tensor? add=None, Tensor(a!)? residual_out=None) -> Tensor");
  m.def("rotary_kv_write(Tensor(a!)? q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor index) -> ()");
  // lossless KV codec (format: csrc/kv_codec_format.h): x [..., S, D] bf16/fp16 <-> blocks
  // [..., ceil(S / block_rows), slot_bytes] uint8 + spill [capacity, spill_unit_bytes] uint8 with its
  // counter spill_used [1] int32; table [16] uint8 (the exponents of codes 0..14). spill_blocks=-1: one
  // spill unit per block (the worst case). kv_encode_out adds to spill_used.
  m.def("kv_encode(Tensor x, Tensor table, int block_rows=16, int escape_capacity=16, int spill_blocks=-1) -> (Tensor, Tensor, Tensor)");
  m.def("kv_encode_out(Tensor(a!) blocks, Tensor(b!) spill, Tensor(c!) spill_used, Tensor x, Tensor table, int block_rows=16, int escape_capacity=16) -> ()");
  m.def("kv_decode(Tensor blocks, Tensor spill, Tensor table, int rows, int head_dim, ScalarType dtype, int block_rows=16, int escape_capacity=16) -> Tensor");
  m.def("kv_decode_out(Tensor(a!) out, Tensor blocks, Tensor spill, Tensor table, int block_rows=16, int escape_capacity=16) -> ()");
}

