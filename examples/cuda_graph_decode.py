"""Batch decode under a CUDA graph: capture BatchDecode.run() once, then re-plan and replay.

A ``BatchDecode(use_cuda_graph=True, max_batch_size=..., max_num_pages=...)`` owns fixed-size
device buffers (its plan, its split-KV partial states, its outputs) and always launches the same
grid, so the kernels a captured ``run()`` recorded stay valid after any later ``plan()`` within
those maxima: a new plan only rewrites the buffers' contents. This script

1. fills a PagedKVCache (every slot nobody owns holds NaN, which must not reach any output),
2. plans a batch, runs it once (warm-up: kernels load, outputs are allocated), and captures one
   ``run()`` on a non-blocking stream,
3. changes the batch twice (a decode step for every sequence; then one sequence leaves and a
   long one takes its place), re-plans on the same stream and replays the graph,
4. checks each replay against cpattn.reference.paged_decode.

What is fixed at capture: q's buffer and the K/V pools (their addresses), num_qo_heads,
num_kv_heads, head_dim, page_size, dtype, layout and the plan options (sm_scale, window_left,
logits_soft_cap). What a re-plan may change: the lengths and page tables, within
max_batch_size and max_num_pages. Here every plan has max_batch_size sequences, so the views
run() returned at capture keep covering the whole batch.

CUDA graphs need a GPU: without one the script says so and runs the same batch changes on a
CPU cache through the NumPy reference (cpattn.reference.paged_decode), at small sizes and
without a graph, each output checked against the keys and values the script itself appended.
"""
import sys

import numpy as np

import cpattn
from cpattn import reference

BATCH, HEADS_QO, HEADS_KV, HEAD_DIM, PAGE_SIZE = 8, 32, 8, 128, 16
NUM_PAGES = 1024  # 16384 token slots in the pools



def dense_decode(q, k, v):
    """One query token a request, straight from its history: q [Hq, D], k / v [L, Hkv, D] ->
    [Hq, D]; query head h reads KV head h // (Hq / Hkv)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = (np.repeat(x, q.shape[0] // x.shape[1], axis=1) for x in (k, v))  # [L, Hq, D]
    scores = np.einsum("hd,lhd->hl", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    return np.einsum("hl,lhd->hd", weights / weights.sum(axis=1, keepdims=True), v)


def batch_changes_on_cpu() -> int:
    """The batch changes of the GPU path on a CPU cache, attention by reference.paged_decode."""
    print("cuda_graph_decode: no CUDA GPU found (CUDA graphs need one): the same re-plans run "
          "through the NumPy reference on the CPU, at small sizes, without a graph")
    rng = np.random.default_rng(0)
    heads_qo, heads_kv, head_dim, page_size = 4, 2, 64, 4
    randn = lambda *shape: rng.standard_normal(shape).astype(np.float16)
    cache = cpattn.PagedKVCache(64, page_size, heads_kv, head_dim, np.float16, device="cpu")
    cache.k_pages.fill(np.nan)  # slots nobody owns: NaN must not reach any output
    cache.v_pages.fill(np.nan)
    history = {}  # seq_id -> (k [L, Hkv, D], v [L, Hkv, D]) as appended

    def append(seq_ids, length):  # `length` new tokens for each sequence
        k, v = randn(length * len(seq_ids), heads_kv, head_dim), randn(length * len(seq_ids),
                                                                       heads_kv, head_dim)
        cache.append(seq_ids, k, v, np.arange(len(seq_ids) + 1, dtype=np.int32) * length)
        for i, seq_id in enumerate(seq_ids):
            old_k, old_v = history.get(seq_id, (k[:0], v[:0]))
            rows = slice(i * length, (i + 1) * length)
            history[seq_id] = (np.concatenate([old_k, k[rows]]), np.concatenate([old_v, v[rows]]))

    live = ["r0", "r1", "r2", "r3"]
    for seq_id in live:
        cache.add_sequence(seq_id)
        append([seq_id], int(rng.integers(1, 20)))
    worst = 0.0
    for step in ("decode step", "r3 leaves, r8 arrives"):
        if step.startswith("r3"):
            cache.free("r3")
            del history["r3"]
            live[live.index("r3")] = "r8"
            cache.add_sequence("r8")
            append(["r8"], 37)
        append([s for s in live if s != "r8"], 1)
        kv_indptr, kv_indices, _, kv_lens = cache.page_table(live)
        q = randn(len(live), heads_qo, head_dim)
        out, _ = reference.paged_decode(q, cache.k_pages, cache.v_pages, kv_indptr, kv_indices,
                                        kv_lens=kv_lens)
        want = np.stack([dense_decode(q[b], *history[s]) for b, s in enumerate(live)])
        err = np.linalg.norm(out - want) / np.linalg.norm(want)
        worst = max(worst, err)
        print(f"after {step}: kv_lens {kv_lens.tolist()}, relative error against the appended "
              f"history {err:.2e}")
        assert np.isfinite(out).all(), "NaN from an unowned slot reached the output"
    assert worst < 1e-2, "the paged cache's output differs from the appended history"
    print("OK")
    return 0


def main() -> int:
    if not cpattn.gpu_available():
        return batch_changes_on_cpu()
    import cupy

    rng = cupy.random.default_rng(0)
    host_rng = np.random.default_rng(0)
    randn = lambda *shape: rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    stream = cupy.cuda.Stream(non_blocking=True)
    # Everything below runs on `stream`: a non-blocking stream is not ordered with the legacy
    # default stream, so no CuPy work may go elsewhere.
    with stream:
        cache = cpattn.PagedKVCache(NUM_PAGES, PAGE_SIZE, HEADS_KV, HEAD_DIM, np.float16)
        cache.k_pages.fill(np.nan)
        cache.v_pages.fill(np.nan)

        def add(seq_id, length):  # a request's prompt K/V (random data stands in for a model)
            cache.add_sequence(seq_id)
            cache.append([seq_id], randn(length, HEADS_KV, HEAD_DIM),
                         randn(length, HEADS_KV, HEAD_DIM),
                         np.array([0, length], np.int32), stream=stream)

        live = [f"r{i}" for i in range(BATCH)]
        for seq_id in live:
            add(seq_id, int(host_rng.integers(1, 600)))

        decode = cpattn.BatchDecode(use_cuda_graph=True, max_batch_size=BATCH,
                                    max_num_pages=NUM_PAGES)
        q = cupy.empty((BATCH, HEADS_QO, HEAD_DIM), np.float16)  # fixed address, rewritten

        def plan():
            kv_indptr, kv_indices, kv_last_page_len, kv_lens = cache.page_table(live)
            # plan() on the replay stream: its upload is ordered before the next replay.
            decode.plan(kv_indptr, kv_indices, kv_last_page_len, HEADS_QO, HEADS_KV, HEAD_DIM,
                        PAGE_SIZE, dtype="float16", stream=stream)
            return kv_indptr, kv_indices, kv_lens

        plan()
        q[...] = randn(BATCH, HEADS_QO, HEAD_DIM)
        decode.run(q, cache, stream=stream)  # warm-up, outside the capture
        stream.begin_capture()
        out = decode.run(q, cache, stream=stream)  # a view of a buffer the wrapper owns
        graph = stream.end_capture()

        worst = 0.0
        for step in ("decode step", "r3 leaves, r8 arrives"):
            if step.startswith("r3"):
                cache.free("r3")
                live[live.index("r3")] = "r8"
                add("r8", 5000)
                others = [s for s in live if s != "r8"]
            else:
                others = list(live)
            # One new token for each of the other sequences (a decode step).
            cache.append(others, randn(len(others), HEADS_KV, HEAD_DIM),
                         randn(len(others), HEADS_KV, HEAD_DIM), stream=stream)
            kv_indptr, kv_indices, kv_lens = plan()
            q[...] = randn(BATCH, HEADS_QO, HEAD_DIM)
            graph.launch(stream)
            stream.synchronize()

            ref_o, _ = reference.paged_decode(cupy.asnumpy(q), cupy.asnumpy(cache.k_pages),
                                              cupy.asnumpy(cache.v_pages), kv_indptr, kv_indices,
                                              kv_lens=kv_lens)
            got = cupy.asnumpy(out).astype(np.float64)
            err = np.linalg.norm(got - ref_o) / np.linalg.norm(ref_o)
            worst = max(worst, err)
            print(f"replay after {step}: kv_lens {kv_lens.tolist()}, relative error {err:.2e}")
            assert np.isfinite(got).all(), "NaN from an unowned slot reached the output"

    print(f"BatchDecode ran on the GPU as a CUDA graph replayed after re-plans; worst relative "
          f"error {worst:.2e}")
    assert worst < 2e-3, "a replay differs from the reference"
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
