"""On Hopper, the sm_90a kernels (wgmma prefill, warp-specialised decode) and the mma.sync ones
(CPATTN_ARCH_PATH=sm80), both against the reference on the same inputs: every mask mode, head_dim,
dtype, ragged and paged keys (page sizes 1, 5 and 16, NaN in every unowned slot), decode, and
split-KV. Elsewhere only the mma.sync path exists and the whole GPU suite covers it."""
import numpy as np
import pytest

import cpattn
import cpattn._arrays as A
from cpattn import _core, reference

from gpu_utils import assert_close, poison_pool, random_qkv, to_device
from test_attention_gpu import KV_LENS as RAGGED_KV, QO_LENS as RAGGED_QO, _options as ragged_options
from test_decode_gpu import paged_batch
from test_paged_prefill_gpu import KV_LENS as PAGED_KV, QO_LENS as PAGED_QO, _options as paged_options

pytestmark = pytest.mark.gpu

PATHS = ("sm90", "sm80")


@pytest.fixture(autouse=True)
def _hopper_only():
    import cupy
    if cupy.cuda.Device().compute_capability != "90":
        pytest.skip("the wgmma path exists on compute capability 9.0 only")


@pytest.fixture
def arch_path(request, monkeypatch):
    """Select the path; check that plan() took it (the ops of the tiles it chose)."""
    if request.param == "sm80":
        monkeypatch.setenv("CPATTN_ARCH_PATH", "sm80")
    else:
        monkeypatch.delenv("CPATTN_ARCH_PATH", raising=False)
    chosen = []
    choose = _core.choose_tiles

    def spy(*args):
        cfg = choose(*args)
        chosen.append(cfg.op)
        return cfg

    monkeypatch.setattr(_core, "choose_tiles", spy)
    yield chosen
    expected = ({"batch_attention_sm90", "batch_decode_sm90"} if request.param == "sm90"
                else {"batch_attention"})
    assert chosen and set(chosen) <= expected, chosen


@pytest.mark.parametrize("arch_path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", (A.FLOAT16, A.BFLOAT16))
@pytest.mark.parametrize("head_dim", (64, 128, 256))
@pytest.mark.parametrize("mode", ("plain", "causal", "window", "soft_cap", "custom_mask"))
def test_ragged_on_both_paths(arch_path, dtype, head_dim, mode):
    import cupy
    rng = np.random.default_rng([head_dim, len(mode)])
    qo_lens, kv_lens = RAGGED_QO + (300,), RAGGED_KV + (2049,)  # a request of many key tiles
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q, k, v = random_qkv(rng, qo_indptr[-1], kv_indptr[-1], 8, 2, head_dim, dtype)
    opts = ragged_options(mode, rng, qo_lens, kv_lens)
    ref_o, ref_lse = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, **opts)
    poison_pool(q.nbytes, qo_indptr[-1] * 8 * 4)
    out, lse = cpattn.varlen_attention(*to_device(q, k, v), qo_indptr, kv_indptr,
                                       return_lse=True, **opts)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


@pytest.mark.parametrize("arch_path", PATHS, indirect=True)
@pytest.mark.parametrize("page_size", (1, 5, 16))
@pytest.mark.parametrize("mode", ("causal", "window", "soft_cap", "custom_mask"))
def test_paged_on_both_paths(arch_path, page_size, mode):
    import cupy
    rng = np.random.default_rng([page_size, len(mode)])
    layout = "HND" if page_size == 5 else "NHD"
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, PAGED_KV, page_size, 2, 128,
                                                       A.BFLOAT16, layout)
    qo_indptr = np.concatenate([[0], np.cumsum(PAGED_QO)]).astype(np.int32)
    q = rng.standard_normal((qo_indptr[-1], 8, 128)).astype(A.BFLOAT16)
    opts = paged_options(mode, rng)
    ref_o, ref_lse = reference.paged_prefill(q, k, v, qo_indptr, kv_indptr, kv_indices,
                                             kv_lens=kv_lens, kv_layout=layout, **opts)
    wrapper = cpattn.BatchPrefillPaged()
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, None, 8, 2, 128, page_size, kv_lens=kv_lens,
                 dtype=A.BFLOAT16, kv_layout=layout, **opts)
    poison_pool(q.nbytes, qo_indptr[-1] * 8 * 4)
    out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)), return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, A.BFLOAT16, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


@pytest.mark.parametrize("arch_path", PATHS, indirect=True)
def test_split_kv_on_both_paths(arch_path):
    """One chunked-prefill request over long keys: its query tiles are cut into key chunks."""
    import cupy
    rng = np.random.default_rng(7)
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, [20000], 16, 2, 128, A.FLOAT16, "NHD")
    qo_indptr = np.array([0, 100], np.int32)
    q = rng.standard_normal((100, 8, 128)).astype(A.FLOAT16)
    ref_o, ref_lse = reference.paged_prefill(q, k, v, qo_indptr, kv_indptr, kv_indices,
                                             kv_lens=kv_lens, causal=True)
    wrapper = cpattn.BatchPrefillPaged()
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, None, 8, 2, 128, 16, kv_lens=kv_lens,
                 causal=True)
    out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)), return_lse=True)
    assert wrapper._plan["launch"].merge is not None  # the split path ran
    assert_close(cupy.asnumpy(out), ref_o, A.FLOAT16, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


@pytest.mark.parametrize("arch_path", PATHS, indirect=True)
@pytest.mark.parametrize("head_dim", (64, 128, 256))
@pytest.mark.parametrize("page_size, layout", ((1, "NHD"), (5, "HND"), (8, "NHD"), (16, "NHD"),
                                               (64, "NHD")))
def test_decode_on_both_paths(arch_path, head_dim, page_size, layout):
    """Decode tiles (one query, the GQA group's heads as rows): TMA pages (8, 16, 64), cp.async
    ones (1, 5 and HND), keys ending anywhere in a tile, an empty request, split and unsplit."""
    import cupy
    rng = np.random.default_rng([head_dim, page_size])
    lens = [0, 1, 15, 17, 63, 64, 65, 200, 1000, 4097]
    k, v, kv_indptr, kv_indices, kv_lens = paged_batch(rng, lens, page_size, 2, head_dim,
                                                       A.FLOAT16, layout)
    q = rng.standard_normal((len(lens), 8, head_dim)).astype(A.FLOAT16)
    ref_o, ref_lse = reference.paged_decode(q, k, v, kv_indptr, kv_indices, kv_lens=kv_lens,
                                            kv_layout=layout)
    wrapper = cpattn.BatchDecode()
    wrapper.plan(kv_indptr, kv_indices, None, 8, 2, head_dim, page_size, kv_lens=kv_lens,
                 kv_layout=layout)
    assert arch_path == ["batch_decode_sm90" if _core.hopper_path() else "batch_attention"]
    poison_pool(q.nbytes, len(lens) * 8 * 4)
    out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)), return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, A.FLOAT16, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")


# Blocks of keys a custom mask leaves visible (1) or empty (0): runs of 1 to 5 empty blocks
# between visible ones. With blocks of a kernel's tile (64 or 128 keys on Hopper), a kernel must
# free the stages of 1 to 5 skipped tiles while it still owes work on an earlier one.
_BLOCKS = (1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1)


@pytest.mark.parametrize("arch_path", PATHS, indirect=True)
@pytest.mark.parametrize("head_dim, block, copies", ((64, 128, 1), (128, 128, 1), (256, 64, 1),
                                                     (128, 128, 20)))
@pytest.mark.parametrize("keys", ("ragged", "paged1", "paged16"))
def test_custom_mask_with_runs_of_empty_tiles_on_both_paths(arch_path, head_dim, block, copies,
                                                            keys):
    """A custom mask whose visible keys come in blocks of a Hopper tile separated by 1 to 5
    empty ones (random bits inside the visible blocks), `copies` requests of it (20: more works
    than CTAs, so the stages run on across works) and a small last one: ragged keys (TMA tiles
    on Hopper), paged with page_size 1 (cp.async tiles) and 16 (a TMA box a page)."""
    import cupy
    from cpattn import mask as cmask
    rng = np.random.default_rng([head_dim, block, copies,
                                 ("ragged", "paged1", "paged16").index(keys)])
    qo_lens = (150,) * copies + (7,)
    kv_lens = (block * len(_BLOCKS),) * copies + (40,)
    visible = np.repeat(np.array(_BLOCKS, bool), block)
    masks = [(rng.random((q, n)) < 0.7) & (visible if n == kv_lens[0] else True)
             for q, n in zip(qo_lens, kv_lens)]
    flat = cmask.flatten(masks)[0]
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    dtype = A.FLOAT16
    q = rng.standard_normal((qo_indptr[-1], 8, head_dim)).astype(dtype)
    if keys == "ragged":
        kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
        _, k, v = random_qkv(rng, 0, kv_indptr[-1], 8, 2, head_dim, dtype)
        ref_o, ref_lse = reference.ragged_prefill(q, k, v, qo_indptr, kv_indptr, custom_mask=flat)
        poison_pool(q.nbytes, qo_indptr[-1] * 8 * 4)
        out, lse = cpattn.varlen_attention(*to_device(q, k, v), qo_indptr, kv_indptr,
                                           custom_mask=flat, return_lse=True)
    else:
        page_size = int(keys[5:])
        k, v, kv_indptr, kv_indices, lens = paged_batch(rng, kv_lens, page_size, 2, head_dim,
                                                        dtype, "NHD")
        ref_o, ref_lse = reference.paged_prefill(q, k, v, qo_indptr, kv_indptr, kv_indices,
                                                 kv_lens=lens, custom_mask=flat)
        wrapper = cpattn.BatchPrefillPaged()
        wrapper.plan(qo_indptr, kv_indptr, kv_indices, None, 8, 2, head_dim, page_size,
                     kv_lens=lens, custom_mask=flat, dtype=dtype)
        poison_pool(q.nbytes, qo_indptr[-1] * 8 * 4)
        out, lse = wrapper.run(cupy.asarray(q), (cupy.asarray(k), cupy.asarray(v)),
                               return_lse=True)
    assert_close(cupy.asnumpy(out), ref_o, dtype, "out")
    assert_close(cupy.asnumpy(lse), ref_lse, A.FLOAT32, "lse")
