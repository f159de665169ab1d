"""Where a T-token step's row first differs from the one-token step's (bf16, CUDA)."""
import sys
import torch
sys.path.insert(0, "/tmp/ci_work")
import chunkinfer
from chunkinfer import ops
from tests.tiny_models import make_model

for D in (64, 128):
    q = torch.randn(1, 8, 10, D, device="cuda").bfloat16()
    k = torch.randn(1, 2, 4096, D, device="cuda").bfloat16()
    lens = torch.tensor([3000], dtype=torch.int32, device="cuda")
    out, _ = ops.decode_attention(q, k, k, lens, split_keys=256)
    bad = []
    for t in range(10):
        one, _ = ops.decode_attention(q[:, :, t:t + 1], k, k, torch.tensor([2991 + t], dtype=torch.int32, device="cuda"),
                                      split_keys=256)
        if not torch.equal(one[:, :, 0], out[:, :, t]):
            bad.append(t)
    print("op D", D, "rows differing", bad)

model = chunkinfer.convert(make_model("llama", dtype=torch.bfloat16, device="cuda", random_norms=True, hidden_size=256,
                                      intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                      layers=4))
model._chunkinfer.cuda_graphs = False
rec = []
real = ops.decode_attention
def spy(q, k, v, lens, starts=None, **kw):
    out = real(q, k, v, lens, starts, **kw)
    rec.append((q.clone(), out[0].clone(), int(lens[0]), kw.get("split_keys")))
    return out
ops.decode_attention = spy
import chunkinfer.loop.step as st
st.ops.decode_attention = spy
ids = torch.randint(3, 250, (1, 3000), device="cuda")
with torch.no_grad():
    cache = model(ids[:, :2990], use_cache=True).past_key_values
    rec.clear()
    step = model(ids[:, 2990:], past_key_values=cache, logits_to_keep=10).logits
    big = list(rec)
    cache.crop(-10)
    rec.clear()
    one = model(ids[:, 2990:2991], past_key_values=cache).logits
    small = list(rec)
print("logits row0 equal", torch.equal(one[:, 0], step[:, 0]))
for li, ((qb, ob, lb, sb), (qs, os_, ls, ss)) in enumerate(zip(big, small)):
    print("layer", li, "q equal", torch.equal(qb[:, :, :1], qs), "attn equal", torch.equal(ob[:, :, :1], os_), lb, ls, sb, ss,
          "q maxdiff", (qb[:, :, :1].float() - qs.float()).abs().max().item())
