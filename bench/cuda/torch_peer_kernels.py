# PyTorch peer for bench_grouped_gemm: the same grouped GEMMs through torch._grouped_mm and the
# same causal attention through scaled_dot_product_attention, timed with CUDA events (median),
# so the CUDA backend's kernels can be compared with what PyTorch runs on the same card.
import torch
import torch.nn.functional as F


def median_ms(fn, warmup=5, reps=50):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    dev = "cuda"
    print("torch", torch.__version__, torch.cuda.get_device_name())
    E, rows = 8, 8192
    R = E * rows
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * rows
    for K, N in ((768, 1536), (1536, 768)):
        x = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16) * 0.05
        dy = torch.randn(R, N, device=dev, dtype=torch.bfloat16)
        flops = 2.0 * R * K * N
        cases = {
            "fwd": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
            "dgrad": lambda: torch._grouped_mm(dy, w, offs=offs),
            "wgrad": lambda: torch._grouped_mm(dy.t(), x, offs=offs),  # bf16 out (f32 is refused)
            "dense fwd": lambda: x @ w[0].t(),
        }
        for name, fn in cases.items():
            try:
                t = median_ms(fn)
                print(f"torch {K}->{N} {name:10s} {t:8.3f} ms {flops / t / 1e9:8.1f} TF/s")
            except Exception as e:  # an API that differs in this torch build
                print(f"torch {K}->{N} {name:10s} failed: {str(e).splitlines()[0][:120]}")
    B, T, H, hd = 16, 1024, 12, 64
    q, k, v = (torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fl = 4.0 * B * H * T * T * hd / 2
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    do = torch.randn_like(o)
    tf = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 2, 10)
    tb = median_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), 2, 10)
    print(f"torch sdpa fwd B16 T1024 H12 hd64: {tf:8.3f} ms {fl / tf / 1e9:8.1f} TF/s")
    print(f"torch sdpa bwd B16 T1024 H12 hd64: {tb:8.3f} ms {2.5 * fl / tb / 1e9:8.1f} TF/s")


if __name__ == "__main__":
    main()
