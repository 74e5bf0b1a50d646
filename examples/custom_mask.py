"""Custom masks in a ragged batch: per-request masks cut from one padded mask, then
cpattn.varlen_attention with custom_mask.

Four requests with different query and key counts share one padded boolean mask
``[batch, max_qo_len, max_kv_len]`` (True = attend), as a model's data pipeline often builds it.
cpattn.mask.from_padded cuts out each request's ``[qo_len, kv_len]`` block (the padding is never
read), cpattn.mask.flatten concatenates the blocks row-major into the flat form varlen_attention
takes. The same masks, bit-packed with cpattn.mask.pack, give the same result.

With a CUDA GPU and CuPy, q / k / v are CuPy arrays and the kernels run; the mask stays a NumPy
array, since plan-time work (bit packing, sorting key tiles into empty / full / partial) is done
on the host. Without a GPU, NumPy q / k / v run the NumPy reference. Either way the result is
checked against cpattn.reference.ragged_prefill.
"""
import numpy as np

import cpattn
from cpattn import mask as cmask
from cpattn import planner, reference

HEADS_QO, HEADS_KV, HEAD_DIM = 8, 2, 64
QO_LENS = [6, 16, 1, 9]
KV_LENS = [20, 16, 33, 9]



def padded_masks(rng) -> np.ndarray:
    """One padded bool mask [batch, max_qo_len, max_kv_len] with a different pattern per request;
    its padding holds random values, to show that nothing outside the valid region is read."""
    batch, max_qo, max_kv = len(QO_LENS), max(QO_LENS), max(KV_LENS)
    padded = rng.random((batch, max_qo, max_kv)) < 0.5
    for b, (qo, kv) in enumerate(zip(QO_LENS, KV_LENS)):
        i = np.arange(qo)[:, None] + kv - qo  # query i's position among the keys
        j = np.arange(kv)[None, :]
        if b == 0:    # causal, bottom-right aligned, with a window of 4 keys
            m = (j <= i) & (j >= i - 4)
        elif b == 1:  # prefix LM: the first 10 tokens see each other, the rest is causal
            m = (j <= i) | (j < 10)
        elif b == 2:  # one query over every key except a band in the middle
            m = (j < 10) | (j >= 20)
        else:         # block sparse: 3 x 3 blocks on the diagonal; query row 8 sees nothing
            m = (i // 3) == (j // 3)
            m[8] = False
        padded[b, :qo, :kv] = m
    return padded


def main() -> None:
    rng = np.random.default_rng(0)
    masks = cmask.from_padded(padded_masks(rng), QO_LENS, KV_LENS)  # list of [qo_len, kv_len]
    flat, _ = cmask.flatten(masks)              # bool [sum(qo_len * kv_len)]
    packed, mask_indptr = cmask.pack(masks)     # uint8 bits, int32 byte offsets [batch + 1]
    qo_indptr = planner.cu_seqlens(np.array(QO_LENS))   # int32 [batch + 1]
    kv_indptr = planner.cu_seqlens(np.array(KV_LENS))
    print(f"qo_indptr {qo_indptr.tolist()}, kv_indptr {kv_indptr.tolist()}; flat mask of "
          f"{flat.size} bits, packed into {packed.size} bytes, mask_indptr {mask_indptr.tolist()}")

    q = rng.standard_normal((qo_indptr[-1], HEADS_QO, HEAD_DIM)).astype(np.float16)
    k = rng.standard_normal((kv_indptr[-1], HEADS_KV, HEAD_DIM)).astype(np.float16)
    v = rng.standard_normal((kv_indptr[-1], HEADS_KV, HEAD_DIM)).astype(np.float16)

    gpu = cpattn.gpu_available()
    if gpu:
        import cupy
        dq, dk, dv = cupy.asarray(q), cupy.asarray(k), cupy.asarray(v)
        out, lse = cpattn.varlen_attention(dq, dk, dv, qo_indptr, kv_indptr, custom_mask=flat,
                                           return_lse=True)
        out_packed = cpattn.varlen_attention(dq, dk, dv, qo_indptr, kv_indptr,
                                             packed_custom_mask=packed, mask_indptr=mask_indptr)
        out, lse, out_packed = cupy.asnumpy(out), cupy.asnumpy(lse), cupy.asnumpy(out_packed)
    else:
        out, lse = cpattn.varlen_attention(q, k, v, qo_indptr, kv_indptr, custom_mask=flat,
                                           return_lse=True)
        out_packed = cpattn.varlen_attention(q, k, v, qo_indptr, kv_indptr,
                                             packed_custom_mask=packed, mask_indptr=mask_indptr)
    where = "CUDA kernel on the GPU" if gpu else "NumPy reference on the CPU"

    ref_o, ref_lse = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, custom_mask=flat)
    err = np.linalg.norm(out - ref_o) / np.linalg.norm(ref_o)
    err_packed = np.linalg.norm(out_packed - ref_o) / np.linalg.norm(ref_o)
    seen = np.isfinite(ref_lse)
    lse_err = np.abs(lse[seen] - ref_lse[seen]).max()
    print(f"varlen_attention with custom_mask ran on the {where}: relative error {err:.2e} "
          f"(packed mask {err_packed:.2e}), max lse error {lse_err:.2e}")

    # A query that sees no key (request 3, row 8) gives output 0 and lse -inf, never NaN.
    empty_row = qo_indptr[3] + 8
    print(f"query row {empty_row} sees no key: output max |o| = "
          f"{np.abs(out[empty_row].astype(np.float32)).max()}, lse = {lse[empty_row, 0]}")
    assert np.isfinite(out.astype(np.float32)).all()
    assert not out[empty_row].any() and np.isneginf(lse[empty_row]).all()
    assert np.array_equal(np.isneginf(lse), ~seen)
    assert err < 2e-3 and err_packed < 2e-3 and lse_err < 1e-2, "differs from the reference"
    print("OK")


if __name__ == "__main__":
    main()
