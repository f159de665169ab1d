#include "kv_layout.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "../message.h"

namespace chunkinfer::offload {
namespace {

// Elements from one (b, h) row to the next. Size-1 dims may carry any stride (as in torch's own
// contiguity rule), so a [1, H, cap, D] view or a slice along capacity is accepted as-is.
int64_t row_pitch(const char* op, const char* name, const at::Tensor& t) {
  const int64_t B = t.size(0), H = t.size(1), cap = t.size(2), D = t.size(3);
  const bool d_ok = D <= 1 || t.stride(3) == 1;
  const bool pos_ok = cap <= 1 || t.stride(2) == D;
  int64_t pitch = cap * D;  // a single row: any pitch >= its width will do
  bool rows_ok = true;
  if (H > 1) {
    pitch = t.stride(1);
    rows_ok = B <= 1 || t.stride(0) == H * t.stride(1);
  } else if (B > 1) {
    pitch = t.stride(0);
  }
  // Rows must not overlap: each holds capacity * D elements.
  rows_ok = rows_ok && (B * H <= 1 || pitch >= cap * D);
  CHUNKINFER_CHECK_VALUE(d_ok && pos_ok && rows_ok, op, ": ", name,
                         " must be laid out as B*H rows of capacity*D elements, i.e. strides "
                         "[H*P, P, D, 1] with P >= capacity*D (a contiguous [B, H, capacity, D] buffer "
                         "or a slice of one along capacity); got shape ", t.sizes(), " with strides ",
                         t.strides(), "; call .contiguous() first");
  return pitch;
}

void check_buffer(const char* op, const char* name, const at::Tensor& t) {
  CHUNKINFER_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  CHUNKINFER_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be a 4-D KV buffer [B, H, capacity, D], got ",
                         t.dim(), "-D shape ", t.sizes());
}

}  // namespace

KVCopy plan_kv_copy(const char* op, const char* src_name, const at::Tensor& src, const char* dst_name,
                    const at::Tensor& dst, int64_t p0, int64_t p1, int64_t dst_p0) {
  check_buffer(op, src_name, src);
  check_buffer(op, dst_name, dst);
  CHUNKINFER_CHECK_VALUE(src.scalar_type() == dst.scalar_type(), op, ": ", src_name, " has dtype ",
                         src.scalar_type(), " but ", dst_name, " has dtype ", dst.scalar_type(),
                         "; they must match");
  const bool same_bhd = src.size(0) == dst.size(0) && src.size(1) == dst.size(1) && src.size(3) == dst.size(3);
  CHUNKINFER_CHECK_VALUE(same_bhd, op, ": ", src_name, " has shape ", src.sizes(), " but ", dst_name,
                         " has shape ", dst.sizes(), "; B, H and D (dims 0, 1 and 3) must match, only "
                         "the capacities (dim 2) may differ");
  const int64_t src_pitch = row_pitch(op, src_name, src);
  const int64_t dst_pitch = row_pitch(op, dst_name, dst);

  if (dst_p0 == -1) dst_p0 = p0;
  const int64_t src_cap = src.size(2), dst_cap = dst.size(2);
  CHUNKINFER_CHECK_VALUE(p0 >= 0 && p0 <= p1, op, ": the range [p0, p1) = [", p0, ", ", p1,
                         ") is invalid: it needs 0 <= p0 <= p1");
  CHUNKINFER_CHECK_VALUE(p1 <= src_cap, op, ": the range [p0, p1) = [", p0, ", ", p1, ") runs past ",
                         src_name, "'s capacity ", src_cap, " (dim 2 of shape ", src.sizes(), ")");
  CHUNKINFER_CHECK_VALUE(dst_p0 >= 0, op, ": dst_p0 must be >= 0 (or -1 for p0), got ", dst_p0);
  const int64_t n = p1 - p0;
  CHUNKINFER_CHECK_VALUE(dst_p0 + n <= dst_cap, op, ": the destination range [dst_p0, dst_p0 + p1 - p0) = [",
                         dst_p0, ", ", dst_p0 + n, ") runs past ", dst_name, "'s capacity ", dst_cap,
                         " (dim 2 of shape ", dst.sizes(), ")");

  const int64_t D = src.size(3), item = static_cast<int64_t>(src.element_size());
  KVCopy plan;
  plan.rows = src.size(0) * src.size(1);
  plan.width = n * D * item;
  plan.src_pitch = src_pitch * item;
  plan.dst_pitch = dst_pitch * item;
  plan.src = static_cast<const char*>(src.data_ptr()) + p0 * D * item;
  plan.dst = static_cast<char*>(dst.data_ptr()) + dst_p0 * D * item;
  return plan;
}

void copy_on_host(const KVCopy& plan) {
  if (plan.bytes() == 0) return;
  // Chunks of about 1 MiB per task; memmove because src and dst may be views of one buffer.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / plan.width);
  at::parallel_for(0, plan.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memmove(plan.dst + r * plan.dst_pitch, plan.src + r * plan.src_pitch, static_cast<size_t>(plan.width));
    }
  });
}

}  // namespace chunkinfer::offload
