"""single_prefill / single_decode / varlen_attention / BatchPrefillRagged against the reference."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import mask as cmask
from cpattn import reference

from gpu_utils import assert_close, poison_pool, random_qkv, to_device

pytestmark = pytest.mark.gpu

DTYPES = (A.FLOAT16, A.BFLOAT16)
HEAD_DIMS = (64, 128, 256)
GQA = (1, 4, 8)
MODES = ("plain", "causal", "window", "soft_cap", "custom_mask")
NUM_KV_HEADS = 2
# A batch with odd lengths, qo_len > kv_len, and empty requests on either side.
QO_LENS = (1, 17, 37, 0, 97, 5, 40)
KV_LENS = (1, 37, 17, 3, 577, 0, 13)


def _options(mode, rng, qo_lens, kv_lens):
    if mode == "causal":
        return dict(causal=True)
    if mode == "window":
        return dict(causal=True, window_left=13)
    if mode == "soft_cap":
        return dict(logits_soft_cap=5.0, sm_scale=0.3)
    if mode == "custom_mask":
        masks = [rng.random((q, k)) < 0.7 for q, k in zip(qo_lens, kv_lens)]
        return dict(custom_mask=cmask.flatten(masks)[0])
    return {}


def _outputs_nbytes(total_q, hq, d, dtype):
    return total_q * hq * d * np.dtype(dtype).itemsize, total_q * hq * 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("gqa", GQA)
@pytest.mark.parametrize("mode", MODES)
def test_varlen_matches_reference(dtype, head_dim, gqa, mode):
    import cupy
    rng = np.random.default_rng([head_dim, gqa, MODES.index(mode)])
    hq = NUM_KV_HEADS * gqa
    qo_indptr = np.concatenate([[0], np.cumsum(QO_LENS)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(KV_LENS)]).astype(np.int32)
    q, k, v = random_qkv(rng, qo_indptr[-1], kv_indptr[-1], hq, NUM_KV_HEADS, head_dim, dtype)
    opts = _options(mode, rng, QO_LENS, KV_LENS)
    ref_o, ref_lse = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, **opts)
    poison_pool(*_outputs_nbytes(qo_indptr[-1], hq, head_dim, dtype))
    out, lse = cpattn.varlen_attention(*to_device(q, k, v), qo_indptr, kv_indptr,
                                       return_lse=True, **opts)
    assert out.dtype == dtype and lse.dtype == np.float32
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", (False, True))
@pytest.mark.parametrize("qo_len, kv_len", ((2049, 2049), (577, 2049), (97, 37)))
def test_single_prefill_long(dtype, causal, qo_len, kv_len):
    import cupy
    rng = np.random.default_rng(qo_len + kv_len)
    q, k, v = random_qkv(rng, qo_len, kv_len, 8, 2, 128, dtype)
    ref_o, ref_lse = reference.single_prefill(q, k, v, causal=causal)
    poison_pool(*_outputs_nbytes(qo_len, 8, 128, dtype))
    out, lse = cpattn.single_prefill(*to_device(q, k, v), causal=causal, return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


def test_single_prefill_hnd_and_strided_heads():
    import cupy
    rng = np.random.default_rng(3)
    q_big, k_big, v_big = random_qkv(rng, 53, 71, 16, 8, 128, np.float16)
    q, k, v = q_big[:, ::2], k_big[:, ::2], v_big[:, ::2]   # head stride 2 * head_dim
    ref_o, ref_lse = reference.single_prefill(q, k, v, causal=True)
    dq, dk, dv = to_device(q_big, k_big, v_big)
    out = cpattn.single_prefill(dq[:, ::2], dk[:, ::2], dv[:, ::2], causal=True)
    assert_close(cupy.asnumpy(out), ref_o, np.float16, "strided")
    k_hnd = cupy.ascontiguousarray(dk[:, ::2].transpose(1, 0, 2))
    v_hnd = cupy.ascontiguousarray(dv[:, ::2].transpose(1, 0, 2))
    out = cpattn.single_prefill(dq[:, ::2], k_hnd, v_hnd, causal=True, kv_layout="HND")
    assert_close(cupy.asnumpy(out), ref_o, np.float16, "HND")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("kv_len", (1, 17, 2049))
def test_single_decode(head_dim, kv_len):
    import cupy
    rng = np.random.default_rng(kv_len)
    q, k, v = random_qkv(rng, 1, kv_len, 32, 8, head_dim, A.BFLOAT16)
    ref_o, ref_lse = reference.single_decode(q[0], k, v, window_left=7, logits_soft_cap=30.0)
    out, lse = cpattn.single_decode(*to_device(q[0], k, v), window_left=7, logits_soft_cap=30.0,
                                    return_lse=True)
    assert out.shape == (32, head_dim) and lse.shape == (32,)
    assert_close(cupy.asnumpy(out), ref_o, A.BFLOAT16, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.BFLOAT16, "lse")


def test_other_requests_cannot_leak_in():
    """NaN in one request's keys and values reaches no other request's output."""
    import cupy
    rng = np.random.default_rng(11)
    qo_indptr = np.concatenate([[0], np.cumsum(QO_LENS)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(KV_LENS)]).astype(np.int32)
    q, k, v = random_qkv(rng, qo_indptr[-1], kv_indptr[-1], 8, 2, 128, np.float16)
    ref_o, _ = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, causal=True)
    poisoned = 4  # request 4 (97 queries over 577 keys): its keys and values become NaN / Inf
    k[kv_indptr[poisoned]:kv_indptr[poisoned + 1]] = np.nan
    v[kv_indptr[poisoned]:kv_indptr[poisoned + 1]] = np.inf
    out = cupy.asnumpy(cpattn.varlen_attention(*to_device(q, k, v), qo_indptr, kv_indptr,
                                               causal=True))
    keep = np.ones(qo_indptr[-1], bool)
    keep[qo_indptr[poisoned]:qo_indptr[poisoned + 1]] = False
    assert_close(out[keep], ref_o[keep], np.float16, "other requests")


def test_batch_prefill_ragged_plan_once_run_per_layer():
    import cupy
    rng = np.random.default_rng(5)
    qo_indptr = np.concatenate([[0], np.cumsum(QO_LENS)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(KV_LENS)]).astype(np.int32)
    wrapper = cpattn.BatchPrefillRagged()
    wrapper.plan(qo_indptr, kv_indptr, 16, 4, 64, causal=True)
    for layer in range(3):
        q, k, v = random_qkv(rng, qo_indptr[-1], kv_indptr[-1], 16, 4, 64, np.float16)
        ref_o, _ = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, causal=True)
        out = wrapper.run(*to_device(q, k, v))
        assert_close(cupy.asnumpy(out), ref_o, np.float16, f"layer {layer}")


def test_out_must_be_16_byte_aligned():
    """Kernels store 16-byte chunks of out: a view 4 bytes into a buffer is refused on the host,
    and the buffer around the view is never written."""
    import cupy
    rng = np.random.default_rng(6)
    qo_indptr = np.array([0, 5, 12], np.int32)
    q, k, v = to_device(*random_qkv(rng, 12, 12, 8, 2, 64, np.float16))
    wrapper = cpattn.BatchPrefillRagged()
    wrapper.plan(qo_indptr, qo_indptr, 8, 2, 64, causal=True)
    buffer = cupy.full(12 * 8 * 64 + 8, 7.0, np.float16)
    out = buffer[2:2 + 12 * 8 * 64].reshape(12, 8, 64)  # C-contiguous, 4 bytes past 16
    with pytest.raises(ValueError, match="out must be 16-byte aligned"):
        wrapper.run(q, k, v, out=out)
    assert bool((buffer == 7.0).all())


def test_packed_mask_input_matches_bool_mask():
    import cupy
    rng = np.random.default_rng(9)
    qo_lens, kv_lens = (3, 17, 9), (40, 17, 1)
    masks = [rng.random((a, b)) < 0.5 for a, b in zip(qo_lens, kv_lens)]
    packed, mask_indptr = cmask.pack(masks)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q, k, v = random_qkv(rng, qo_indptr[-1], kv_indptr[-1], 4, 4, 128, np.float16)
    ref_o, _ = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr,
                                        custom_mask=cmask.flatten(masks)[0])
    out = cpattn.varlen_attention(*to_device(q, k, v), qo_indptr, kv_indptr,
                                  packed_custom_mask=packed, mask_indptr=mask_indptr)
    assert_close(cupy.asnumpy(out), ref_o, np.float16, "packed mask")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_block_sparse_mask_with_empty_and_full_tiles(dtype, head_dim):
    """Masks made of whole 32-key blocks (empty, full) plus a causal-shaped request: the planned
    tile classes skip empty tiles and read no bits in full ones, with the same result."""
    import cupy
    rng = np.random.default_rng(head_dim)
    qo_lens, kv_lens = (300, 129, 64), (700, 129, 64)
    blocks = [rng.random((-(-q // 16), -(-k // 32))) < 0.5 for q, k in zip(qo_lens, kv_lens)]
    masks = [np.kron(bl, np.ones((16, 32), bool))[:q, :k] for bl, q, k in zip(blocks, qo_lens, kv_lens)]
    masks[1] = np.tril(np.ones((129, 129), bool))  # the causal shape
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q, k, v = random_qkv(rng, qo_indptr[-1], kv_indptr[-1], 8, 2, head_dim, dtype)
    flat = cmask.flatten(masks)[0]
    ref_o, ref_lse = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, custom_mask=flat)
    poison_pool(*_outputs_nbytes(qo_indptr[-1], 8, head_dim, dtype))
    out, lse = cpattn.varlen_attention(*to_device(q, k, v), qo_indptr, kv_indptr,
                                       custom_mask=flat, return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")
