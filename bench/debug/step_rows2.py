import sys
import torch
sys.path.insert(0, "/tmp/ci_work")
import chunkinfer
from chunkinfer import ops
from tests.tiny_models import make_model
model = chunkinfer.convert(make_model("llama", dtype=torch.bfloat16, device="cuda", random_norms=True, hidden_size=256,
                                      intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                      layers=4))
model._chunkinfer.cuda_graphs = False
rec = []
def wrap(name, fn):
    def f(x, *a, **kw):
        out = fn(x, *a, **kw)
        norm = kw.get("norm")
        rec.append((name, x[:, :1].clone(), None if norm is None or norm.add is None else norm.add[:, :1].clone(), out[:, :1].clone(), x.shape[1]))
        return out
    return f
import chunkinfer.loop.step as st, chunkinfer.loop.layer as ly
st.ops.gemv = wrap("gemv", ops.gemv)
st.ops.gemv_act_and_mul = wrap("act", ops.gemv_act_and_mul)
ids = torch.randint(3, 250, (1, 3000), device="cuda")
with torch.no_grad():
    cache = model(ids[:, :2990], use_cache=True).past_key_values
    rec.clear()
    step = model(ids[:, 2990:], past_key_values=cache, logits_to_keep=10).logits
    big = [r for r in rec]
    cache.crop(-10)
    rec.clear()
    one = model(ids[:, 2990:2991], past_key_values=cache).logits
    small = list(rec)
print("logits row0 equal", torch.equal(one[:, 0], step[:, 0]), len(big), len(small))
for L in range(4):
    for k, bj in zip(range(4), (0, 3, 4, 5)):
        r, b = small[4 * L + k], big[12 * L + bj]
        print(L, r[0], b[4], "x", torch.equal(b[1], r[1]), "add", None if r[2] is None else torch.equal(b[2], r[2]),
              "out", torch.equal(b[3], r[3]))
r, b = small[16], big[48]
print("head", "x", torch.equal(b[1], r[1]), "add", torch.equal(b[2], r[2]), "out", torch.equal(b[3], r[3]))
