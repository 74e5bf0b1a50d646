"""Benchmark suites: each builds one case's inputs, times cpattn and the peers on them, and checks
a sample of the output against cpattn.reference. A suite returns one result row (a dict): the
figure (``value``, ``unit``, ``pct_ceiling``), times, the check (``rel_err``, ``tolerance``,
``check`` "ok" or "FAIL"), ``peers`` ({label: figure}) and, when a peer raised,
``peer_errors`` ({peer: message})."""
from __future__ import annotations

import numpy as np
import cupy

import cpattn
from cpattn import _arrays as A
from cpattn import reference

DTYPES = {"float16": A.FLOAT16, "bfloat16": A.BFLOAT16}

#: Relative error (Frobenius) allowed against the float64 reference, by output dtype: the GPU
#: tests' tolerances (tests/gpu_utils.py RTOL; tests/test_benchmarks.py keeps the two equal).
TOLERANCE = {A.FLOAT16: 1e-3, A.BFLOAT16: 1e-2}


def rel_err(ours, ref) -> float:
    """``|ours - ref| / |ref|`` (Frobenius) in float64; NaN or Inf when ``ours`` holds any."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def check(ours, ref, dtype) -> dict:
    """The sample check of a result row: its relative error, the tolerance of ``dtype`` and
    ``check`` "ok" when the error is within it, "FAIL" otherwise (NaN and Inf fail).

    >>> ref = np.ones((4, 8)); check(ref.astype(np.float16), ref, np.float16)["check"]
    'ok'
    >>> off = ref * 1.005
    >>> check(off, ref, np.float16)["check"], check(off, ref, A.BFLOAT16)["check"]
    ('FAIL', 'ok')
    >>> check(np.full((4, 8), np.nan), ref, np.float16)["check"]
    'FAIL'
    """
    err, tol = rel_err(ours, ref), TOLERANCE[np.dtype(dtype)]
    return {"rel_err": err, "tolerance": tol, "check": "ok" if err <= tol else "FAIL"}


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters.

    >>> short_error(RuntimeError("CUDA error: out of memory\\nmore"))
    'RuntimeError: CUDA error: out of memory'
    """
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def run_peers(row: dict, peers: dict) -> None:
    """Run each peer on its own and gather ``row["peers"]`` ({label: figure}).

    ``peers`` maps a peer's name to a function returning {label: figure}. A peer that raises is
    noted in ``row["peer_errors"]`` ({name: message}) and the others still run: a peer's
    failure (a bug of its own, a shape it lacks) must not stop cpattn's figures.
    """
    row["peers"] = {}
    for name, fn in peers.items():
        try:
            row["peers"].update(fn())
        except Exception as exc:  # whatever a peer raises is reported, not raised
            row.setdefault("peer_errors", {})[name] = short_error(exc)


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def _flashinfer():
    try:
        import flashinfer
        return flashinfer
    except Exception:  # absent, or its import fails (no compiler, wrong torch)
        return None


def _flashinfer_context():
    """(torch, flashinfer, a 256 MB workspace, host or CuPy array -> torch CUDA tensor), or None
    when either peer library is absent."""
    torch, fi = _torch(), _flashinfer()
    if torch is None or fi is None:
        return None
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    return torch, fi, workspace, lambda x: torch.from_dlpack(cupy.asarray(x))


def _attention_options(case) -> dict:
    """Per-case options beyond the shapes (model presets: Gemma-2's soft cap, sliding windows)."""
    return {k: case[k] for k in ("logits_soft_cap", "window_left") if k in case}


def _describe(opts) -> str:
    return "".join(f" {k}={v}" for k, v in opts.items())


def _random(shape, dtype, rng):
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def rotation_sets(nbytes: int, l2_bytes: int) -> int:
    """Input sets a memory-bound case rotates through, one per timed run, so that no run finds
    its inputs in L2 left there by the run before: enough sets to cover twice the L2 (at most
    1024), or 1 when one set already does.

    >>> rotation_sets(512 << 10, 60 << 20), rotation_sets(1 << 30, 60 << 20)
    (240, 1)
    """
    return max(1, min(1024, -(-2 * l2_bytes // max(nbytes, 1))))


class Rotation:
    """``copies`` sets of a case's inputs (the first the given arrays, the others copies of
    them, so every set gives the same output); ``next()`` returns the set of the next run."""

    def __init__(self, arrays: tuple, nbytes: int):
        l2 = cupy.cuda.Device().attributes["L2CacheSize"]
        self.copies = rotation_sets(nbytes, l2)
        self.sets = [arrays] + [tuple(a.copy() for a in arrays) for _ in range(self.copies - 1)]
        self._i = 0

    def next(self) -> tuple:
        self._i = (self._i + 1) % self.copies
        return self.sets[self._i]

    def warmed(self, fn):
        """A function running ``fn(*set)`` on the next set each call, after one call on every
        set: the steady state of a loop over layers, where each set was seen before."""
        run = lambda: fn(*self.next())
        for _ in range(self.copies):
            run()
        return run

    def as_torch(self):
        """The sets as torch tensors (DLPack, no copy) and a function giving the next set, for
        a peer to rotate through the same inputs."""
        import torch
        tsets = [tuple(torch.from_dlpack(x) for x in one) for one in self.sets]
        turn = iter(range(1 << 62))
        return tsets, lambda: tsets[next(turn) % len(tsets)]


# ---- decode ------------------------------------------------------------------------------------

def decode(case, peers, time_ms, host_us, ceil):
    """Paged batch decode: B requests of L tokens, K+V bytes read counted."""
    b, length = case["batch"], case["kv_len"]
    hq, hkv, d, ps = case.get("qo_heads", 32), case.get("kv_heads", 8), case.get("head_dim", 128), \
        case.get("page_size", 16)
    dtype = DTYPES[case.get("dtype", "float16")]
    rng = cupy.random.default_rng(0)
    pages_per = -(-length // ps)
    num_pages = b * pages_per
    k_pages = _random((num_pages, ps, hkv, d), dtype, rng)
    v_pages = _random((num_pages, ps, hkv, d), dtype, rng)
    q = _random((b, hq, d), dtype, rng)
    kv_indices = np.random.default_rng(0).permutation(num_pages).astype(np.int32)
    kv_indptr = (np.arange(b + 1) * pages_per).astype(np.int32)
    last = np.full(b, length - (pages_per - 1) * ps, np.int32)
    opts = _attention_options(case)
    wrapper = cpattn.BatchDecode()
    plan = lambda: wrapper.plan(kv_indptr, kv_indices, last, hq, hkv, d, ps, dtype=dtype, **opts)
    plan_us = host_us(plan, 20)
    out = cupy.empty((b, hq, d), dtype)
    nbytes = 2 * b * length * hkv * d * np.dtype(dtype).itemsize
    sets = Rotation((q, k_pages, v_pages), nbytes)  # inputs smaller than L2: rotated
    run = sets.warmed(lambda q, k, v: wrapper.run(q, (k, v), out=out))
    ms, spread = time_ms(run)
    run_us = host_us(run)
    row = dict(case=f"B{b} L{length} {hq}/{hkv} hd{d} p{ps}{_describe(opts)}", unit="GB/s",
               value=nbytes / ms / 1e6, input_sets=sets.copies,
               ms=ms, spread_ms=spread, plan_us=plan_us, run_us=run_us)
    row["pct_ceiling"] = 100 * row["value"] / ceil["copy_GBps"]
    # Sample check: request 0 against the reference.
    pages = kv_indices[:pages_per]
    k0 = cupy.asnumpy(k_pages[pages]).reshape(-1, hkv, d)[:length]
    v0 = cupy.asnumpy(v_pages[pages]).reshape(-1, hkv, d)[:length]
    ref, _ = reference.single_decode(cupy.asnumpy(q[0]), k0, v0, **opts)
    row.update(check(cupy.asnumpy(out[0]), ref, dtype))
    run_peers(row, {"flashinfer": lambda: _decode_peers(
        sets, kv_indptr, kv_indices, last, (hq, hkv, d, ps), nbytes, time_ms, opts)}
        if peers else {})
    return row


def _decode_peers(sets, kv_indptr, kv_indices, last, dims, nbytes, time_ms, opts):
    ctx = _flashinfer_context()
    if ctx is None:
        return {}
    torch, fi, workspace, dev = ctx
    hq, hkv, d, ps = dims
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    tsets, next_set = sets.as_torch()
    wrapper.plan(dev(kv_indptr), dev(kv_indices), dev(last), hq, hkv, d, ps,
                 q_data_type=tsets[0][0].dtype, kv_data_type=tsets[0][0].dtype,
                 window_left=opts.get("window_left", -1),
                 logits_soft_cap=opts.get("logits_soft_cap") or None)
    run = lambda: (lambda q, k, v: wrapper.run(q, (k, v)))(*next_set())
    ms, _ = time_ms(run)
    return {"flashinfer": nbytes / ms / 1e6}


# ---- prefill (dense batches of equal lengths) and ragged ------------------------------------------

def _prefill_flops(qo_lens, kv_lens, hq, d, causal):
    flops = 0.0
    for q, k in zip(qo_lens, kv_lens):
        pairs = q * k - (q * (q - 1) / 2 if causal else 0)  # visible (query, key) pairs
        flops += 4.0 * pairs * d * hq
    return flops


def _ragged_case(qo_lens, kv_lens, hq, hkv, d, causal, dtype, peers_kind, peers, time_ms,
                 host_us, ceil, name, causal_mask=False, opts=None):
    rng = cupy.random.default_rng(1)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    q = _random((int(qo_indptr[-1]), hq, d), dtype, rng)
    k = _random((int(kv_indptr[-1]), hkv, d), dtype, rng)
    v = _random((int(kv_indptr[-1]), hkv, d), dtype, rng)
    wrapper = cpattn.BatchPrefillRagged()
    mask = None
    if causal_mask:  # causality given as a custom mask (bottom-right lower triangles)
        mask = cpattn.mask.flatten([np.tri(q, k, k - q, dtype=bool)
                                    for q, k in zip(qo_lens, kv_lens)])[0]
    opts = opts or {}
    plan = lambda: wrapper.plan(qo_indptr, kv_indptr, hq, hkv, d, causal=causal and not causal_mask,
                                custom_mask=mask, dtype=dtype, **opts)
    plan_us = host_us(plan, 3 if causal_mask else 10)
    out = cupy.empty(q.shape, dtype)
    run = lambda: wrapper.run(q, k, v, out=out)
    ms, spread = time_ms(run)
    flops = _prefill_flops(qo_lens, kv_lens, hq, d, causal)
    row = dict(case=name, unit="TFLOP/s", value=flops / ms / 1e9, ms=ms, spread_ms=spread,
               plan_us=plan_us, run_us=host_us(run, 20))
    row["pct_ceiling"] = 100 * row["value"] / ceil["matmul_bf16_TFLOPs"]
    # Sample check: the last 64 queries of request 0, first GQA group.
    g = hq // hkv
    q0, k0, v0 = (cupy.asnumpy(x) for x in (q[:qo_lens[0]], k[:kv_lens[0]], v[:kv_lens[0]]))
    tail = min(64, qo_lens[0])
    ref, _ = reference.attend(q0[-tail:, :g], k0[:, :1], v0[:, :1], causal=causal, **opts)
    row.update(check(cupy.asnumpy(out[qo_lens[0] - tail:qo_lens[0], :g]), ref, dtype))
    # Peers run plain (causal) attention: with extra options their figure would not compare.
    peer_name, peer_fn = peers_kind
    run_peers(row, {peer_name: lambda: peer_fn(q, k, v, qo_indptr, kv_indptr, qo_lens,
                                               (hq, hkv, d), causal, flops, time_ms)}
              if peers and not opts else {})
    return row


def _sdpa_peers(q, k, v, qo_indptr, kv_indptr, qo_lens, dims, causal, flops, time_ms):
    """Torch SDPA (FlashAttention-2 and cuDNN backends) on the dense [B, H, S, D] equivalent."""
    torch = _torch()
    if torch is None:
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    hq, hkv, d = dims
    b, s = len(qo_lens), qo_lens[0]
    tq = torch.from_dlpack(q).view(b, s, hq, d).transpose(1, 2)
    tk = torch.from_dlpack(k).view(b, s, hkv, d).transpose(1, 2)
    tv = torch.from_dlpack(v).view(b, s, hkv, d).transpose(1, 2)
    found = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=causal, enable_gqa=hq != hkv)
                ms, _ = time_ms(fn)
            found[name] = flops / ms / 1e9
        except RuntimeError:  # backend unavailable for this shape
            found[name] = None
    return found


def _flashinfer_ragged_peers(q, k, v, qo_indptr, kv_indptr, qo_lens, dims, causal, flops, time_ms):
    ctx = _flashinfer_context()
    if ctx is None:
        return {}
    torch, fi, workspace, dev = ctx
    hq, hkv, d = dims
    wrapper = fi.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD")
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    wrapper.plan(dev(qo_indptr), dev(kv_indptr), hq, hkv, d, causal=causal, q_data_type=tq.dtype)
    ms, _ = time_ms(lambda: wrapper.run(tq, tk, tv))
    return {"flashinfer": flops / ms / 1e9}


def prefill(case, peers, time_ms, host_us, ceil):
    """Dense prefill: B requests of S queries over their own S keys."""
    b, s = case["batch"], case["seq_len"]
    hq, hkv, d = case.get("qo_heads", 32), case.get("kv_heads", 32), case.get("head_dim", 128)
    causal = case.get("causal", False)
    causal_mask = case.get("causal_mask", False)
    kind = " causal-shaped custom mask" if causal_mask else (" causal" if causal else "")
    opts = _attention_options(case)
    name = f"B{b} S{s} {hq}/{hkv} hd{d}{kind}{_describe(opts)}"
    return _ragged_case([s] * b, [s] * b, hq, hkv, d, causal or causal_mask,
                        DTYPES[case.get("dtype", "float16")], ("torch sdpa", _sdpa_peers), peers,
                        time_ms, host_us, ceil, name, causal_mask, opts)


def ragged(case, peers, time_ms, host_us, ceil):
    """Ragged prefill: requests with lengths uniform in [low, high], qo_len == kv_len."""
    lens = np.random.default_rng(case.get("seed", 0)).integers(
        case["low"], case["high"] + 1, case["batch"]).tolist()
    hq, hkv, d = case.get("qo_heads", 32), case.get("kv_heads", 8), case.get("head_dim", 128)
    causal = case.get("causal", True)
    opts = _attention_options(case)
    name = (f"{case['batch']} x [{case['low']}, {case['high']}] {hq}/{hkv} hd{d}"
            f"{' causal' if causal else ''}{_describe(opts)}")
    return _ragged_case(lens, lens, hq, hkv, d, causal, DTYPES[case.get("dtype", "float16")],
                        ("flashinfer", _flashinfer_ragged_peers), peers, time_ms, host_us,
                        ceil, name, opts=opts)


def chunked(case, peers, time_ms, host_us, ceil):
    """Paged (chunked) prefill: B requests of ``new`` queries onto ``cached`` cached tokens."""
    b, new, cached = case["batch"], case["new"], case["cached"]
    hq, hkv, d, ps = case.get("qo_heads", 32), case.get("kv_heads", 8), case.get("head_dim", 128), \
        case.get("page_size", 16)
    causal = case.get("causal", True)
    dtype = DTYPES[case.get("dtype", "float16")]
    rng = cupy.random.default_rng(2)
    kv_len = cached + new
    pages_per = -(-kv_len // ps)
    num_pages = b * pages_per
    k_pages = _random((num_pages, ps, hkv, d), dtype, rng)
    v_pages = _random((num_pages, ps, hkv, d), dtype, rng)
    q = _random((b * new, hq, d), dtype, rng)
    kv_indices = np.random.default_rng(1).permutation(num_pages).astype(np.int32)
    kv_indptr = (np.arange(b + 1) * pages_per).astype(np.int32)
    qo_indptr = (np.arange(b + 1) * new).astype(np.int32)
    last = np.full(b, kv_len - (pages_per - 1) * ps, np.int32)
    wrapper = cpattn.BatchPrefillPaged()
    plan = lambda: wrapper.plan(qo_indptr, kv_indptr, kv_indices, last, hq, hkv, d, ps,
                                causal=causal, dtype=dtype)
    plan_us = host_us(plan, 10)
    out = cupy.empty(q.shape, dtype)
    run = lambda: wrapper.run(q, (k_pages, v_pages), out=out)
    ms, spread = time_ms(run)
    flops = _prefill_flops([new] * b, [kv_len] * b, hq, d, causal)
    row = dict(case=f"B{b} {new} new onto {cached} {hq}/{hkv} hd{d} p{ps}"
                    f"{' causal' if causal else ''}", unit="TFLOP/s", value=flops / ms / 1e9,
               ms=ms, spread_ms=spread, plan_us=plan_us, run_us=host_us(run, 20))
    row["pct_ceiling"] = 100 * row["value"] / ceil["matmul_bf16_TFLOPs"]
    pages = kv_indices[:pages_per]
    k0 = cupy.asnumpy(k_pages[pages]).reshape(-1, hkv, d)[:kv_len, :1]
    v0 = cupy.asnumpy(v_pages[pages]).reshape(-1, hkv, d)[:kv_len, :1]
    # Sample check: the last (up to) 64 queries of request 0, first GQA group.
    g, tail = hq // hkv, min(64, new)
    ref, _ = reference.attend(cupy.asnumpy(q[new - tail:new, :g]), k0, v0, causal=causal)
    row.update(check(cupy.asnumpy(out[new - tail:new, :g]), ref, dtype))
    run_peers(row, {"flashinfer": lambda: _flashinfer_paged_peers(
        q, k_pages, v_pages, (qo_indptr, kv_indptr, kv_indices, last), (hq, hkv, d, ps), causal,
        flops, time_ms)} if peers else {})
    return row


def _flashinfer_paged_peers(q, k_pages, v_pages, table, dims, causal, flops, time_ms):
    ctx = _flashinfer_context()
    if ctx is None:
        return {}
    torch, fi, workspace, dev = ctx
    qo_indptr, kv_indptr, kv_indices, last = table
    hq, hkv, d, ps = dims
    peer = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    tq = torch.from_dlpack(q)
    peer.plan(dev(qo_indptr), dev(kv_indptr), dev(kv_indices), dev(last), hq, hkv, d, ps,
              causal=causal, q_data_type=tq.dtype, kv_data_type=tq.dtype)
    cache = (torch.from_dlpack(k_pages), torch.from_dlpack(v_pages))
    ms, _ = time_ms(lambda: peer.run(tq, cache))
    return {"flashinfer": flops / ms / 1e9}


# ---- MLA ---------------------------------------------------------------------------------------

def mla(case, peers, time_ms, host_us, ceil):
    """Batch MLA over a paged latent cache: B requests of L tokens, qo_len queries each (causal).
    TFLOP/s (2 * (576 + 512) per visible (query, head, key)) when heads >= 64, else GB/s of
    ckv + kpe read; the other figure goes in ``also``."""
    b, length, heads = case["batch"], case["kv_len"], case["heads"]
    qo, ps = case.get("qo_len", 1), case.get("page_size", 64)
    dtype = DTYPES[case.get("dtype", "bfloat16")]
    ckv_dim, kpe_dim, scale = 512, 64, (128 + 64) ** -0.5
    rng = cupy.random.default_rng(3)
    pages_per = -(-length // ps)
    num_pages = b * pages_per
    ckv = _random((num_pages, ps, ckv_dim), dtype, rng)
    kpe = _random((num_pages, ps, kpe_dim), dtype, rng)
    q_nope = _random((b * qo, heads, ckv_dim), dtype, rng)
    q_pe = _random((b * qo, heads, kpe_dim), dtype, rng)
    kv_indices = np.random.default_rng(3).permutation(num_pages).astype(np.int32)
    kv_indptr = (np.arange(b + 1) * pages_per).astype(np.int32)
    qo_indptr = (np.arange(b + 1) * qo).astype(np.int32)
    kv_lens = np.full(b, length, np.int32)
    causal = qo > 1
    wrapper = cpattn.BatchMLA()
    plan = lambda: wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_lens, heads, ckv_dim,
                                kpe_dim, ps, causal=causal, sm_scale=scale, dtype=dtype)
    plan_us = host_us(plan, 20)
    out = cupy.empty((b * qo, heads, ckv_dim), dtype)
    nbytes = b * length * (ckv_dim + kpe_dim) * np.dtype(dtype).itemsize
    sets = Rotation((q_nope, q_pe, ckv, kpe), nbytes)  # inputs smaller than L2: rotated
    run = lambda: wrapper.run(*sets.next(), out=out)
    ms, spread = time_ms(run)
    pairs = b * (qo * length - (qo * (qo - 1) // 2 if causal else 0))  # visible (query, key)
    flops = 2.0 * (ckv_dim + kpe_dim + ckv_dim) * heads * pairs
    tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
    compute = heads >= 64
    row = dict(case=f"B{b} L{length} H{heads} qo{qo} p{ps}", unit="TFLOP/s" if compute else "GB/s",
               value=tflops if compute else gbps, input_sets=sets.copies, ms=ms,
               spread_ms=spread, plan_us=plan_us,
               run_us=host_us(run, 20),
               also=f"{gbps:.0f} GB/s" if compute else f"{tflops:.0f} TFLOP/s")
    row["pct_ceiling"] = 100 * (tflops / ceil["matmul_bf16_TFLOPs"] if compute
                                else gbps / ceil["copy_GBps"])
    # Sample check: request 0 (its last query) against the reference.
    pages = kv_indices[:pages_per]
    one = np.array([0, 1], np.int32)
    ref, _ = reference.mla(cupy.asnumpy(q_nope[qo - 1:qo]), cupy.asnumpy(q_pe[qo - 1:qo]),
                           cupy.asnumpy(ckv[pages]), cupy.asnumpy(kpe[pages]), one,
                           np.array([0, pages_per], np.int32), np.arange(pages_per, dtype=np.int32),
                           kv_lens=kv_lens[:1], sm_scale=scale)
    row.update(check(cupy.asnumpy(out[qo - 1:qo]), ref, dtype))
    # The peer's figure in the unit of ours: FLOPs or bytes (x 1e3: GB/s, not TFLOP/s) per time.
    work = flops if compute else nbytes * 1e3
    run_peers(row, {"flashinfer": lambda: _flashinfer_mla_peers(
        sets, (qo_indptr, kv_indptr, kv_indices, kv_lens), (heads, ckv_dim, kpe_dim, ps), causal,
        scale, work, time_ms)} if peers else {})
    return row


def _flashinfer_mla_peers(sets, table, dims, causal, scale, work, time_ms):
    ctx = _flashinfer_context()
    if ctx is None:
        return {}
    torch, fi, workspace, dev = ctx
    qo_indptr, kv_indptr, kv_indices, kv_lens = table
    heads, ckv_dim, kpe_dim, ps = dims
    peer = fi.mla.BatchMLAPagedAttentionWrapper(workspace)
    tsets, next_set = sets.as_torch()
    peer.plan(dev(qo_indptr), dev(kv_indptr), dev(kv_indices), dev(kv_lens), heads, ckv_dim,
              kpe_dim, ps, causal, scale, tsets[0][0].dtype, tsets[0][0].dtype)
    peer_ms, _ = time_ms(lambda: peer.run(*next_set()))
    return {"flashinfer": work / peer_ms / 1e9}


# ---- cascade (shared prefix) ---------------------------------------------------------------------

def cascade(case, peers, time_ms, host_us, ceil):
    """B requests share a ``prefix`` of cached tokens and own ``unique`` more each; one new query
    (decode) per request. Figure: K+V bytes a flat decode would read (the prefix once per
    request) per second, so that cascade and flat compare on one scale. ``% ceiling`` is of the
    bytes the cascade does read (the prefix once): that rate and the flat BatchDecode's over
    the concatenated page tables go in ``also``. Inputs under twice the L2 are rotated."""
    b, prefix, unique = case["batch"], case["prefix"], case["unique"]
    hq, hkv, d, ps = case.get("qo_heads", 32), case.get("kv_heads", 8), case.get("head_dim", 128), \
        case.get("page_size", 16)
    dtype = DTYPES[case.get("dtype", "float16")]
    rng = cupy.random.default_rng(4)
    prefix_pages, own_pages = -(-prefix // ps), -(-unique // ps)
    assert prefix % ps == 0, "the prefix fills whole pages (flat tables concatenate them)"
    num_pages = prefix_pages + b * own_pages
    k_pages = _random((num_pages, ps, hkv, d), dtype, rng)
    v_pages = _random((num_pages, ps, hkv, d), dtype, rng)
    q = _random((b, hq, d), dtype, rng)
    order = np.random.default_rng(4).permutation(num_pages).astype(np.int32)
    shared, own = order[:prefix_pages], order[prefix_pages:].reshape(b, own_pages)
    i32 = lambda x: np.asarray(x, np.int32)
    levels = ([i32([0, b]), i32(np.arange(b + 1))], [i32([0, prefix_pages]),
              i32(np.arange(b + 1) * own_pages)], [shared, own.reshape(-1)],
              [i32([prefix]), np.full(b, unique, np.int32)])
    dims = (hq, hkv, d, ps)
    wrapper = cpattn.CascadeAttention(2)
    plan = lambda: wrapper.plan(*levels, hq, hkv, d, ps, causal=True, dtype=dtype)
    plan_us = host_us(plan, 10)
    token_bytes = 2 * hkv * d * np.dtype(dtype).itemsize  # K + V of one token
    read = (prefix + b * unique) * token_bytes  # what the cascade reads: the prefix once
    nbytes = b * (prefix + unique) * token_bytes  # what a flat decode reads
    sets = Rotation((q, k_pages, v_pages), read)  # inputs smaller than twice the L2: rotated
    run = sets.warmed(lambda q, k, v: wrapper.run(q, (k, v)))
    ms, spread = time_ms(run)
    out = run()  # every set holds the same inputs, so any run's output is the one to check
    row = dict(case=f"B{b} prefix {prefix} + {unique} own, {hq}/{hkv} hd{d} p{ps} decode",
               unit="GB/s flat-equivalent", value=nbytes / ms / 1e6, input_sets=sets.copies,
               ms=ms, spread_ms=spread, plan_us=plan_us, run_us=host_us(run, 20))
    row["pct_ceiling"] = 100 * (read / ms / 1e6) / ceil["copy_GBps"]
    flat_ms = _flat_decode(sets, shared, own, dims, prefix + unique, dtype, time_ms)
    row["also"] = (f"{read / ms / 1e6:.0f} GB/s read, cpattn flat BatchDecode "
                   f"{nbytes / flat_ms / 1e6:.0f} GB/s flat-equivalent")
    row.update(_cascade_check(q, k_pages, v_pages, out, shared, own, dims, prefix + unique,
                              dtype))
    last = [i32([ps]), np.full(b, unique - (own_pages - 1) * ps, np.int32)]
    run_peers(row, {"flashinfer": lambda: _flashinfer_cascade_peers(
        sets, levels, last, dims, nbytes, time_ms)} if peers else {})
    return row


def _flat_tables(shared, own, requests):
    """Page table of ``requests`` (ids into ``own``'s rows) when each lists the prefix pages
    then its own: ``(kv_indptr, kv_indices)``, int32."""
    indices = np.concatenate([np.concatenate([shared, own[r]]) for r in requests])
    indptr = np.arange(len(requests) + 1) * (len(shared) + own.shape[1])
    return indptr.astype(np.int32), indices.astype(np.int32)


def _flat_decode(sets, shared, own, dims, kv_len, dtype, time_ms) -> float:
    """Milliseconds of cpattn's BatchDecode over the flat tables (each request reads the
    prefix itself), on the same rotated inputs."""
    hq, hkv, d, ps = dims
    b = own.shape[0]
    indptr, indices = _flat_tables(shared, own, range(b))
    flat = cpattn.BatchDecode()
    flat.plan(indptr, indices, None, hq, hkv, d, ps, kv_lens=np.full(b, kv_len, np.int32),
              dtype=dtype)
    run = sets.warmed(lambda q, k, v: flat.run(q, (k, v)))
    ms, _ = time_ms(run)
    return ms


def _cascade_check(q, k_pages, v_pages, out, shared, own, dims, kv_len, dtype) -> dict:
    """Requests 0 and B-1, first GQA group, against reference.paged_decode over each one's
    prefix pages followed by its own (the concatenated keys)."""
    hq, hkv, d, ps = dims
    g = hq // hkv
    sample = sorted({0, own.shape[0] - 1})
    _, ids = _flat_tables(shared, own, sample)
    pages = lambda pool: cupy.asnumpy(pool[ids][:, :, :1])  # kv head 0: [pages, ps, 1, d]
    n, per = len(sample), len(ids) // len(sample)
    ref, _ = reference.paged_decode(
        cupy.asnumpy(q)[sample, :g], pages(k_pages), pages(v_pages),
        (np.arange(n + 1) * per).astype(np.int32), np.arange(n * per, dtype=np.int32),
        kv_lens=np.full(n, kv_len, np.int32))
    return check(cupy.asnumpy(out)[sample, :g], ref, dtype)


def _flashinfer_cascade_peers(sets, levels, last, dims, nbytes, time_ms):
    ctx = _flashinfer_context()
    if ctx is None:
        return {}
    torch, fi, workspace, dev = ctx
    hq, hkv, d, ps = dims
    peer = fi.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    tsets, next_set = sets.as_torch()
    peer.plan([dev(x) for x in levels[0]], [dev(x) for x in levels[1]],
              [dev(x) for x in levels[2]], [dev(x) for x in last], hq, hkv, d, ps,
              causal=True, q_data_type=tsets[0][0].dtype)
    peer_ms, _ = time_ms(lambda: (lambda q, k, v: peer.run(q, (k, v)))(*next_set()))
    return {"flashinfer cascade": nbytes / peer_ms / 1e6}


SUITES = {"decode": decode, "prefill": prefill, "ragged": ragged, "chunked": chunked, "mla": mla,
          "cascade": cascade}
