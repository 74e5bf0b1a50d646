"""PyTorch tensors in and out of cpattn with no copy, through DLPack.

cpattn has no PyTorch dependency: it takes any DLPack tensor. A CUDA torch tensor comes in
through ``cupy.from_dlpack`` (zero copy, on CuPy's current stream) and runs the kernels; the
result is a CuPy array, which ``torch.from_dlpack(out)`` turns back into a torch tensor on the
same memory. The script checks that memory is shared both ways, compares cpattn with torch's own
float32 attention, and checks the result against cpattn.reference.

Causal alignment: cpattn aligns causal masks bottom-right (query i of qo_len sees key j of kv_len
iff ``j <= i + kv_len - qo_len``); ``scaled_dot_product_attention(is_causal=True)`` aligns them
top-left. The two agree only when qo_len == kv_len, so the second comparison below (qo_len <
kv_len) gives torch an explicit bottom-right mask.

Without CUDA in torch, the CPU path runs: NumPy views of CPU tensors (``Tensor.numpy()``) run
the NumPy reference, and ``torch.from_numpy`` wraps the result. Without torch, the script says
so and exits.
"""
import sys

import numpy as np

import cpattn
from cpattn import reference

HEADS_QO, HEADS_KV, HEAD_DIM = 16, 4, 128


def on_gpu(torch) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def torch_attention(torch, q, k, v, mask=None, is_causal=False):
    """torch's float32 attention of one request: q [qo_len, Hq, D], k / v [kv_len, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    # SDPA takes [batch, heads, len, dim]; GQA: query head h reads kv head h // group.
    q4, k4, v4 = (x.float().transpose(0, 1)[None] for x in (q, k, v))
    k4, v4 = k4.repeat_interleave(group, dim=1), v4.repeat_interleave(group, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask,
                                                           is_causal=is_causal)
    return out[0].transpose(0, 1)


def bottom_right_causal(torch, qo_len, kv_len, device):
    """bool [qo_len, kv_len], True = attend: cpattn's causal mask, for torch."""
    return torch.ones(qo_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - qo_len)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_gpu(torch) -> None:
    import cupy
    gen = torch.Generator(device="cuda").manual_seed(0)
    # (dtype, qo_len, kv_len): equal lengths compare with is_causal; qo_len < kv_len needs a mask.
    for dtype, qo_len, kv_len, tol in ((torch.float16, 200, 200, 2e-3),
                                       (torch.bfloat16, 50, 300, 2e-2)):
        tq, tk, tv = (torch.randn(n, h, HEAD_DIM, device="cuda", dtype=dtype, generator=gen)
                      for n, h in ((qo_len, HEADS_QO), (kv_len, HEADS_KV), (kv_len, HEADS_KV)))
        # Zero copy in: the CuPy view cpattn makes of a torch tensor is the same memory.
        assert cupy.from_dlpack(tq).data.ptr == tq.data_ptr()
        out = cpattn.single_prefill(tq, tk, tv, causal=True)   # a CuPy array
        t_out = torch.from_dlpack(out)                         # zero copy back
        assert t_out.data_ptr() == out.data.ptr and t_out.dtype == dtype and t_out.is_cuda

        note = ""
        if qo_len == kv_len:
            expected = torch_attention(torch, tq, tk, tv, is_causal=True)
            how = "SDPA is_causal=True (top-left, the same as bottom-right at equal lengths)"
        else:
            mask = bottom_right_causal(torch, qo_len, kv_len, "cuda")
            expected = torch_attention(torch, tq, tk, tv, mask=mask)
            how = "SDPA with an explicit bottom-right mask"
            top_left = torch_attention(torch, tq, tk, tv, is_causal=True)
            note = (f"\n  (SDPA is_causal=True, aligned top-left, differs from it by "
                    f"{rel_err(top_left.cpu(), expected.cpu()):.2f} relative)")
        err_torch = rel_err(t_out.float().cpu(), expected.cpu())
        ref_o, _ = reference.single_prefill(*(x.float().cpu().numpy() for x in (tq, tk, tv)),
                                            causal=True)
        err_ref = rel_err(t_out.float().cpu(), ref_o)
        print(f"{str(dtype)[6:]} q [{qo_len}, {HEADS_QO}, {HEAD_DIM}], kv_len {kv_len}: vs torch "
              f"float32 {how}: {err_torch:.2e}; vs cpattn.reference: {err_ref:.2e}{note}")
        assert err_torch < tol and err_ref < tol, "differs from torch or the reference"


def run_cpu(torch) -> None:
    gen = torch.Generator().manual_seed(0)
    qo_len, kv_len = 24, 40
    tq, tk, tv = (torch.randn(n, h, HEAD_DIM, generator=gen).half()
                  for n, h in ((qo_len, HEADS_QO), (kv_len, HEADS_KV), (kv_len, HEADS_KV)))
    # NumPy views of the CPU tensors (no copy); NumPy in runs the reference and returns NumPy.
    # (CPU tensors themselves also work: cpattn takes them in with numpy.from_dlpack.)
    out = cpattn.single_prefill(tq.numpy(), tk.numpy(), tv.numpy(), causal=True)
    t_out = torch.from_numpy(out)   # a torch tensor on the same memory
    assert t_out.data_ptr() == out.ctypes.data and t_out.dtype == torch.float16
    expected = torch_attention(torch, tq, tk, tv,
                               mask=bottom_right_causal(torch, qo_len, kv_len, "cpu"))
    err_torch = rel_err(t_out.float(), expected)
    ref_o, _ = reference.single_prefill(tq.numpy(), tk.numpy(), tv.numpy(), causal=True)
    err_ref = rel_err(out, ref_o)
    print(f"float16 q [{qo_len}, {HEADS_QO}, {HEAD_DIM}], kv_len {kv_len}: vs torch float32 SDPA "
          f"with a bottom-right mask: {err_torch:.2e}; vs cpattn.reference: {err_ref:.2e}")
    assert err_torch < 2e-3 and err_ref < 2e-3, "differs from torch or the reference"


def main() -> int:
    try:
        import torch
    except ImportError:
        print("interop_torch: PyTorch is not installed; nothing to show (pip install torch to "
              "see torch tensors go in and out of cpattn).")
        return 0
    if on_gpu(torch):
        print(f"torch {torch.__version__} with CUDA: torch tensors in, CUDA kernels on the GPU, "
              "torch tensors out")
        run_gpu(torch)
    else:
        print(f"torch {torch.__version__} without CUDA (or no CuPy GPU): NumPy views in, NumPy "
              "reference on the CPU, torch tensors out")
        run_cpu(torch)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
