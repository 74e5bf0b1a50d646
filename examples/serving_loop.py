"""A small continuous-batching decode loop: requests arrive and finish while a paged KV cache
grows, and every step plans once and runs attention for each layer.

Each step:

1. admit waiting requests (up to MAX_LIVE live): add the sequence and write its prompt's K/V
   (random data stands in for a model; the prompt's own attention, a prefill call, is left
   out);
2. append the new token's K/V of every live sequence, in every layer;
3. ``page_table()`` of the live sequences, then ``BatchDecode.plan()`` once (host only);
4. ``BatchDecode.run()`` for each of LAYERS layers, into preallocated outputs;
5. retire the requests that produced all their tokens (their pages go back to the free list).

Each layer has its own K/V pools, here one PagedKVCache per layer: every cache sees the same
add / append / free calls, so their page tables stay identical and one plan serves all layers.
The script reports decode tokens per second and the host microseconds of plan() and run(), then
checks the last step's output of one layer against cpattn.reference.paged_decode.

The paged decode loop needs a GPU: without one the script says so and exits.
"""
import sys
import time

import numpy as np

import cpattn
from cpattn import reference

LAYERS, HEADS_QO, HEADS_KV, HEAD_DIM, PAGE_SIZE = 8, 32, 8, 128, 16
MAX_LIVE, STEPS, NUM_REQUESTS = 32, 160, 80
PROMPT_LENS, OUTPUT_LENS = (16, 1500), (8, 96)
# Room for MAX_LIVE requests of the longest prompt and output: admission never runs out of pages
# (a tighter pool would catch cpattn.OutOfPagesError and keep the request waiting).
NUM_PAGES = MAX_LIVE * -(-(PROMPT_LENS[1] + OUTPUT_LENS[1]) // PAGE_SIZE)
BANK = 4096      # rows of pregenerated random K/V and q, sliced every step
CHECK_LAYER = 3



def main() -> int:
    if not cpattn.gpu_available():
        print("serving_loop: the paged decode loop (BatchDecode) needs a CUDA GPU and CuPy; none "
              "found, nothing to run.")
        return 0
    import cupy

    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.integers(0, STEPS * 2 // 3, NUM_REQUESTS))
    arrivals[0] = 0
    waiting = [dict(id=i, arrival=int(a), prompt=int(rng.integers(*PROMPT_LENS)),
                    output=int(rng.integers(*OUTPUT_LENS)), done=0)
               for i, a in enumerate(arrivals)]

    dev_rng = cupy.random.default_rng(0)
    bank = lambda *shape: dev_rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    k_bank, v_bank = bank(LAYERS, BANK, HEADS_KV, HEAD_DIM), bank(LAYERS, BANK, HEADS_KV, HEAD_DIM)
    q_bank = bank(BANK, HEADS_QO, HEAD_DIM)
    out = cupy.empty((LAYERS, MAX_LIVE, HEADS_QO, HEAD_DIM), np.float16)

    caches = [cpattn.PagedKVCache(NUM_PAGES, PAGE_SIZE, HEADS_KV, HEAD_DIM, np.float16)
              for _ in range(LAYERS)]
    decode = cpattn.BatchDecode()
    live: list = []
    plan_us, run_us, append_us, tokens, max_queued = [], [], [], 0, 0
    start = None
    for step in range(STEPS):
        if step == 1:  # step 0 compiles / loads the kernels: time from here on
            cupy.cuda.get_current_stream().synchronize()
            start, tokens = time.perf_counter(), 0

        # 1. Admit arrived requests while there is room.
        while waiting and waiting[0]["arrival"] <= step and len(live) < MAX_LIVE:
            req = waiting.pop(0)
            n, off = req["prompt"], int(rng.integers(0, BANK - req["prompt"]))
            indptr = np.array([0, n], np.int32)
            for layer, cache in enumerate(caches):
                cache.add_sequence(req["id"])
                cache.append([req["id"]], k_bank[layer, off:off + n], v_bank[layer, off:off + n],
                             indptr)
            live.append(req)
        max_queued = max(max_queued, sum(req["arrival"] <= step for req in waiting))
        if not live:
            continue
        ids = [req["id"] for req in live]
        batch = len(ids)
        off = (step * 37) % (BANK - MAX_LIVE - LAYERS)

        # 2. The new token's K/V for every live sequence, layer by layer.
        t0 = time.perf_counter()
        for layer, cache in enumerate(caches):
            cache.append(ids, k_bank[layer, off:off + batch], v_bank[layer, off:off + batch])
        t1 = time.perf_counter()

        # 3. One plan for all layers.
        kv_indptr, kv_indices, kv_last_page_len, kv_lens = caches[0].page_table(ids)
        decode.plan(kv_indptr, kv_indices, kv_last_page_len, HEADS_QO, HEADS_KV, HEAD_DIM,
                    PAGE_SIZE, dtype="float16")
        t2 = time.perf_counter()

        # 4. Attention of every layer (q would come from the layer's projection).
        for layer, cache in enumerate(caches):
            q = q_bank[off + layer:off + layer + batch]
            decode.run(q, cache, out=out[layer, :batch])
        t3 = time.perf_counter()
        append_us.append((t1 - t0) * 1e6)
        plan_us.append((t2 - t1) * 1e6)
        run_us.append((t3 - t2) * 1e6 / LAYERS)
        tokens += batch
        last = dict(ids=ids, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_lens=kv_lens,
                    q=q_bank[off + CHECK_LAYER:off + CHECK_LAYER + batch],
                    lockstep=np.array_equal(caches[CHECK_LAYER].page_table(ids)[1], kv_indices))

        # 5. Retire finished requests in every layer's cache.
        for req in live:
            req["done"] += 1
        for req in [r for r in live if r["done"] == r["output"]]:
            for cache in caches:
                cache.free(req["id"])
            live.remove(req)

    cupy.cuda.get_current_stream().synchronize()
    elapsed = time.perf_counter() - start
    finished = NUM_REQUESTS - len(waiting) - len(live)
    print(f"{STEPS} steps, {NUM_REQUESTS} requests ({finished} finished, {len(live)} live at the "
          f"end, up to {max_queued} kept waiting for a free slot), {LAYERS} layers, "
          f"{HEADS_QO}/{HEADS_KV} heads, head_dim {HEAD_DIM}, page_size {PAGE_SIZE}, fp16")
    print(f"decode: {tokens / elapsed:,.0f} tokens/s over {elapsed:.2f} s; host us per step "
          f"(median): plan {np.median(plan_us):.0f}, run {np.median(run_us):.0f} per layer, "
          f"append {np.median(append_us) / LAYERS:.0f} per layer")

    # The last step, layer CHECK_LAYER, against the reference. Only the pages the batch owns are
    # copied to the host, and the page ids renumbered into that copy.
    cache = caches[CHECK_LAYER]
    assert last["lockstep"], "the layers' page tables differ"
    pages, local = np.unique(last["kv_indices"], return_inverse=True)
    owned = cupy.asarray(pages)
    ref_o, _ = reference.paged_decode(
        cupy.asnumpy(last["q"]), cupy.asnumpy(cache.k_pages[owned]),
        cupy.asnumpy(cache.v_pages[owned]), last["kv_indptr"], local.astype(np.int32),
        kv_lens=last["kv_lens"])
    got = cupy.asnumpy(out[CHECK_LAYER, :len(last["ids"])]).astype(np.float64)
    err = np.linalg.norm(got - ref_o) / np.linalg.norm(ref_o)
    print(f"BatchDecode ran on the GPU; last step, layer {CHECK_LAYER}: batch {len(last['ids'])}, "
          f"kv_lens {last['kv_lens'].min()}..{last['kv_lens'].max()}, relative error {err:.2e}")
    assert err < 2e-3, "the last step differs from the reference"
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
