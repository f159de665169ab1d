"""Which piece of a step computes a row differently with more rows in the call (bf16, CUDA)."""
import torch
from chunkinfer import ops
torch.manual_seed(0)
dev = "cuda"
K, M = 256, 768
for n in (2, 3, 4):
    x = torch.randn(1, n, K, device=dev).bfloat16()
    w = torch.randn(M, K, device=dev).bfloat16() * 0.05
    nw = torch.randn(K, device=dev).bfloat16()
    add = torch.randn(1, n, K, device=dev).bfloat16()
    a = ops.gemv(x, [w])
    b = ops.gemv(x[:, :1].contiguous(), [w])
    print("gemv n", n, torch.equal(a[:, :1], b))
    ro4, ro1 = torch.empty_like(x), torch.empty_like(x[:, :1])
    a = ops.gemv(x, [w], norm=ops.NormPrologue(nw, 1e-6, add=add, residual_out=ro4))
    b = ops.gemv(x[:, :1].contiguous(), [w], norm=ops.NormPrologue(nw, 1e-6, add=add[:, :1].contiguous(), residual_out=ro1))
    print("gemv+norm n", n, torch.equal(a[:, :1], b), torch.equal(ro4[:, :1], ro1))
    g = torch.randn(M, K, device=dev).bfloat16() * 0.05
    a = ops.gemv_act_and_mul(x, w, g, "silu")
    b = ops.gemv_act_and_mul(x[:, :1].contiguous(), w, g, "silu")
    print("act n", n, torch.equal(a[:, :1], b))
    # slices of a larger tensor, as the step passes them
    big = torch.randn(1, 10, K, device=dev).bfloat16()
    a = ops.gemv(big[:, 0:4], [w])
    b = ops.gemv(big[:, 0:1], [w])
    print("gemv slices", torch.equal(a[:, :1], b))
import transformers as T
cfg = T.LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=512,
                    num_hidden_layers=1, vocab_size=256)
rot = T.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).to(dev)
xx = torch.zeros(1, 10, 256, device=dev).bfloat16()
c10, s10 = rot(xx, torch.arange(2990, 3000, device=dev)[None])
c1, s1 = rot(xx[:, :1], torch.arange(2990, 2991, device=dev)[None])
print("rope", torch.equal(c10[:, :1], c1), torch.equal(s10[:, :1], s1))
