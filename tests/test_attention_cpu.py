"""Attention entry points on the CPU: the NumPy path and every host-side validation error."""
import numpy as np
import pytest

import cpattn
from cpattn import reference

Q = np.random.default_rng(0).standard_normal((5, 4, 64)).astype(np.float16)
KV = np.random.default_rng(1).standard_normal((9, 2, 64)).astype(np.float16)


def test_numpy_inputs_run_the_reference():
    out, lse = cpattn.single_prefill(Q, KV, KV, causal=True, return_lse=True)
    ref, ref_lse = reference.single_prefill(Q, KV, KV, causal=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-3)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(causal=True, custom_mask=np.ones((5, 9), bool)), ValueError, "mutually exclusive"),
    (dict(window_left=-2), ValueError, r"window_left must be an int in \[-1, 2\^31 - 1\]"),
    (dict(window_left=2 ** 40), ValueError, "window_left must be an int"),
    (dict(logits_soft_cap=float("nan")), ValueError, "logits_soft_cap must be a finite number"),
    (dict(logits_soft_cap=-1.0), ValueError, "logits_soft_cap must be a finite number >= 0"),
    (dict(sm_scale=float("inf")), ValueError, "sm_scale must be a finite number > 0"),
    (dict(kv_layout="NDH"), ValueError, 'kv_layout must be "NHD" or "HND"'),
])
def test_single_prefill_option_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        cpattn.single_prefill(Q, KV, KV, **kwargs)


@pytest.mark.parametrize("args, error, match", [
    ((Q.astype(np.float32), KV, KV), ValueError, "q must have dtype float16, bfloat16; got float32"),
    ((Q, KV.astype(np.float32), KV), ValueError, r"k must have the dtype of q \(float16\)"),
    ((Q, KV, KV[:5]), ValueError, r"v must have shape \(that of k\) = \(9, 2, 64\); got \(5, 2, 64\)"),
    ((Q[:, :3], KV, KV), ValueError, r"num_qo_heads \(3\) must be a positive multiple"),
    ((Q, KV[..., :32], KV[..., :32]), ValueError, "k must have head_dim 64"),
    ((None, KV, KV), TypeError, "q must be a CuPy or NumPy array or a DLPack tensor; got None"),
    (([1.0], KV, KV), TypeError, "q must be a CuPy or NumPy array"),
])
def test_single_prefill_input_errors(args, error, match):
    with pytest.raises(error, match=match):
        cpattn.single_prefill(*args)


def test_single_decode_wants_two_dimensional_q():
    with pytest.raises(ValueError, match=r"q must have shape \[num_qo_heads, head_dim\]"):
        cpattn.single_decode(Q, KV, KV)


def _plan(**kwargs):
    args = dict(qo_indptr=np.array([0, 2, 5], np.int32), kv_indptr=np.array([0, 4, 9], np.int32),
                num_qo_heads=4, num_kv_heads=2, head_dim=64)
    args.update(kwargs)
    cpattn.BatchPrefillRagged().plan(args.pop("qo_indptr"), args.pop("kv_indptr"),
                                     args.pop("num_qo_heads"), args.pop("num_kv_heads"),
                                     args.pop("head_dim"), **args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(head_dim=96), NotImplementedError, "head_dim 96 is not supported; supported: 64, 128, 256"),
    (dict(head_dim=64.0), TypeError, "head_dim must be an integer"),
    (dict(num_kv_heads=3), ValueError, r"num_qo_heads \(4\) must be a positive multiple"),
    (dict(qo_indptr=np.array([0, 2, 5], np.int64)), ValueError, "qo_indptr must have dtype int32"),
    (dict(qo_indptr=np.array([1, 2, 5], np.int32)), ValueError, "qo_indptr must start at 0"),
    (dict(qo_indptr=np.array([0, 5, 2], np.int32)), ValueError,
     r"qo_indptr must be non-decreasing; qo_indptr\[1\]=5 > qo_indptr\[2\]=2"),
    (dict(qo_indptr=np.array([0, 2 ** 31 - 1, -10], np.int32)), ValueError,
     "qo_indptr must be non-decreasing"),
    (dict(kv_indptr=np.array([0, 9], np.int32)), ValueError, "kv_indptr must have batch"),
    (dict(custom_mask=np.ones(7, bool)), ValueError, r"custom_mask must hold sum\(qo_len \* kv_len\) = 23"),
    (dict(mask_indptr=np.array([0, 1, 3], np.int32)), ValueError,
     "mask_indptr goes with packed_custom_mask"),
    (dict(packed_custom_mask=np.zeros(4, np.uint8)), ValueError, "packed_custom_mask needs mask_indptr"),
    (dict(custom_mask=np.ones(23, bool), packed_custom_mask=np.zeros(4, np.uint8)), ValueError,
     "not both"),
    (dict(dtype="float32"), ValueError, "dtype must be float16 or bfloat16; got float32"),
])
def test_ragged_plan_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _plan(**kwargs)


def test_run_before_plan():
    with pytest.raises(RuntimeError, match="run\\(\\) before plan\\(\\)"):
        cpattn.BatchPrefillRagged().run(Q, KV, KV)
    with pytest.raises(RuntimeError, match="run\\(\\) before plan\\(\\)"):
        cpattn.BatchPrefillPaged().run(Q, (KV, KV))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(causal="no"), TypeError, "causal must be a bool; got str"),
    (dict(causal=None), TypeError, "causal must be a bool; got NoneType"),
    (dict(sm_scale="0.1"), TypeError, "sm_scale must be a number; got str"),
    (dict(logits_soft_cap=None), TypeError, "logits_soft_cap must be a number; got NoneType"),
    (dict(window_left=True), ValueError, "window_left must be an int"),
])
def test_option_types_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        cpattn.single_prefill(Q, KV, KV, **kwargs)


def test_the_cpu_path_takes_the_gpus_head_dims_only():
    q, kv = np.zeros((2, 4, 96), np.float16), np.zeros((3, 2, 96), np.float16)
    with pytest.raises(NotImplementedError, match="head_dim 96 is not supported"):
        cpattn.single_prefill(q, kv, kv)
    with pytest.raises(NotImplementedError, match="head_dim 96 is not supported"):
        cpattn.varlen_attention(q, kv, kv, np.array([0, 2], np.int32), np.array([0, 3], np.int32))


@pytest.mark.parametrize("cu_q, cu_k, error, match", [
    (np.array([0, 5], np.int32), np.array([0, 4, 9], np.int32), ValueError,
     "cu_seqlens_q and cu_seqlens_k must both have batch \\+ 1 entries; got 2 and 3"),
    (np.array([0, 5], np.int64), np.array([0, 9], np.int32), ValueError,
     "cu_seqlens_q must have dtype int32"),
    (np.array([0, 5], np.int32), np.array([1, 9], np.int32), ValueError,
     "cu_seqlens_k must start at 0"),
    (None, np.array([0, 9], np.int32), TypeError, "cu_seqlens_q must be a CuPy or NumPy array"),
])
def test_varlen_errors_name_cu_seqlens(cu_q, cu_k, error, match):
    with pytest.raises(error, match=match):
        cpattn.varlen_attention(Q, KV, KV, cu_q, cu_k)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_qo_heads="8"), TypeError, "num_qo_heads must be an integer; got str"),
    (dict(num_kv_heads=2.0), TypeError, "num_kv_heads must be an integer; got float"),
    (dict(head_dim="64"), TypeError, "head_dim must be an integer; got str"),
    (dict(head_dim=True), TypeError, "head_dim must be an integer; got bool"),
    (dict(dtype="fp16"), TypeError, 'dtype must be "float16" or "bfloat16"'),
    (dict(dtype=None), TypeError, 'dtype must be "float16" or "bfloat16"'),
])
def test_plan_argument_types_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        _plan(**kwargs)
    args = dict(num_qo_heads=4, num_kv_heads=2, head_dim=64)
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(error, match=match):  # BatchDecode checks them the same way
        cpattn.BatchDecode().plan(np.array([0, 1], np.int32), np.array([0], np.int32),
                                  np.array([1], np.int32), args["num_qo_heads"],
                                  args["num_kv_heads"], args["head_dim"], 16,
                                  **{k: v for k, v in kwargs.items() if k == "dtype"})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_batch_size=-1, max_num_pages=8), ValueError, "max_batch_size must be >= 1; got -1"),
    (dict(max_batch_size=2.5, max_num_pages=8), TypeError, "max_batch_size must be an integer"),
    (dict(max_batch_size=0, max_num_pages=8), ValueError, "max_batch_size must be >= 1; got 0"),
    (dict(max_batch_size=4, max_num_pages=8, max_items=-3), ValueError,
     "max_items must be >= 0; got -3"),
    (dict(max_num_pages=8), ValueError, "missing: max_batch_size"),
])
def test_graph_limits_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        cpattn.BatchDecode(use_cuda_graph=True, **kwargs)
    with pytest.raises(error, match=match):
        cpattn.BatchMLA(use_cuda_graph=True, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(custom_mask=np.ones(23, np.float32)), "custom_mask must be bool .*; got dtype float32"),
    (dict(custom_mask=np.full(23, 2, np.uint8)), "custom_mask must be bool .*; got uint8 holding 2"),
    (dict(packed_custom_mask=np.zeros(4, np.int8), mask_indptr=np.array([0, 1, 3], np.int32)),
     "packed_custom_mask must be a uint8 ndarray"),
    (dict(packed_custom_mask=np.zeros(2, np.uint8), mask_indptr=np.array([0, 1, 3], np.int32)),
     "packed_custom_mask is too short"),
])
def test_mask_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _plan(**kwargs)


def test_numpy_path_takes_masks_as_arrays_only():
    with pytest.raises(TypeError, match="custom_mask must be a CuPy or NumPy array"):
        cpattn.varlen_attention(Q, KV, KV, np.array([0, 5], np.int32), np.array([0, 9], np.int32),
                                custom_mask=[True] * 45)
