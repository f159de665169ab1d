import sys
import torch
sys.path.insert(0, "/tmp/ci_work")
import chunkinfer
import chunkinfer.loop.step as st
from tests.tiny_models import make_model
model = chunkinfer.convert(make_model("llama", dtype=torch.bfloat16, device="cuda", random_norms=True, hidden_size=256,
                                      intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                      layers=4))
model._chunkinfer.cuda_graphs = False
mb = model._chunkinfer.binding
calls = []
for name in ("exact_block", "matrix_block", "step_logits"):
    real = getattr(st, name)
    def make(real=real, name=name):
        def f(*a, **k):
            calls.append(name)
            return real(*a, **k)
        return f
    setattr(st, name, make())
import chunkinfer.loop.step_path as sp
sp.step_logits = st.step_logits
ids = torch.randint(3, 250, (1, 3000), device="cuda")
with torch.no_grad():
    cache = model(ids[:, :2990], use_cache=True).past_key_values
    calls.clear()
    step = model(ids[:, 2990:], past_key_values=cache, logits_to_keep=10).logits
    print("T=10", calls[:3], len(calls), st.exact_rows(mb, torch.zeros(1, 10, 256, device="cuda", dtype=torch.bfloat16)))
    cache.crop(-10)
    calls.clear()
    one = model(ids[:, 2990:2991], past_key_values=cache).logits
    print("T=1", calls[:3], len(calls))
    print(mb.memo)
