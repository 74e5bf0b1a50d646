"""Continuous batching over a paged KV cache: requests arrive and finish, pages are allocated and
freed, and every step plans once and runs chunked prefill and decode for every layer.

Each step:

1. admit the requests that have arrived (up to ``max_live`` at once);
2. schedule: every request that has finished its prompt decodes one token; the requests still
   prefilling share a budget of ``chunk`` prompt tokens, so a prompt longer than the budget is
   prefilled over several steps (chunked prefill);
3. allocate: ``PagedKVCache.grow`` gives each scheduled request room for its new tokens, and
   ``page_table()`` reads the page table the step attends over;
4. plan once (host only): ``BatchPrefillPaged.plan`` for the prefill chunks (causal: each
   chunk's queries see the request's cached tokens and the chunk itself), ``BatchDecode.plan``
   for the decodes; a step with no prefill or no decode skips that wrapper;
5. for every layer: write the step's new K/V into the layer's pools (``append_paged_kv``), then
   run prefill and decode over them;
6. retire the requests that produced all their tokens: their pages go back to the free list.

One PagedKVCache allocates the pages of all layers: a token has the same page and slot in every
layer's pools, so one page table, and one plan per wrapper, serves every layer. (Its own pools
are layer 0's; ``PagedKVCache.append`` grows and writes one pool pair in one call, which fits a
single layer.) Random data stands in for the model's q, k and v. Every slot no request owns
holds NaN, which must never reach an output.

On a CUDA GPU the wrappers run the kernels; the first pass over the schedule compiles and loads
them and checks one step of one layer against cpattn.reference, the second is timed. Without a
GPU the same loop runs at small sizes on a CPU cache (NumPy pools) through the NumPy reference
(``reference.paged_prefill`` / ``reference.paged_decode``). Either way the script says which path
it took and reports prefill and decode tokens per second and the host time of plan() and run().
"""
import sys
import time
from dataclasses import dataclass

import numpy as np

import cpattn
from cpattn import reference


@dataclass(frozen=True)
class Sizes:
    """The attention shapes of the model, the cache's page size and the workload."""
    layers: int
    heads_qo: int
    heads_kv: int
    head_dim: int
    page_size: int
    max_live: int          # requests in the batch at once
    chunk: int             # prompt tokens prefilled per step, over all prefilling requests
    steps: int
    num_requests: int
    prompt_lens: tuple     # [low, high) of the prompt lengths
    output_lens: tuple     # [low, high) of the tokens each request generates

    @property
    def num_pages(self) -> int:
        # Room for max_live requests of the longest prompt and output: admission never runs out
        # of pages (a tighter pool would catch cpattn.OutOfPagesError and keep requests waiting).
        longest = self.prompt_lens[1] + self.output_lens[1]
        return self.max_live * -(-longest // self.page_size)

    @property
    def max_tokens(self) -> int:  # new tokens of one step: the prefill chunks and the decodes
        return self.chunk + self.max_live


GPU_SIZES = Sizes(layers=8, heads_qo=32, heads_kv=8, head_dim=128, page_size=16, max_live=32,
                  chunk=2048, steps=160, num_requests=80, prompt_lens=(16, 4000),
                  output_lens=(8, 96))
CPU_SIZES = Sizes(layers=2, heads_qo=4, heads_kv=2, head_dim=64, page_size=8, max_live=4,
                  chunk=48, steps=40, num_requests=10, prompt_lens=(5, 120), output_lens=(2, 12))
CHECK_LAYER = 1  # the layer and the new tokens of each request that are checked
CHECK_ROWS = 16


@dataclass
class Request:
    id: int
    arrival: int           # the step it arrives at
    prompt: int            # prompt tokens
    output: int            # tokens to generate
    prefilled: int = 0     # prompt tokens in the cache
    generated: int = 0
    chunks: int = 0        # steps its prompt took


@dataclass
class Step:
    """One step's batch of requests: the prefilling ones first, then the decoding ones.

    ``table`` is ``PagedKVCache.page_table()`` once the step's tokens have their pages:
    (kv_indptr [batch + 1], kv_indices [kv_indptr[-1]], kv_last_page_len [batch],
    kv_lens [batch]), int32."""
    prefills: list              # [(Request, new tokens)]
    decodes: list               # [Request]
    new_indptr: np.ndarray      # int32 [batch + 1]: each request's rows of q (its new tokens)
    kv_lens_before: np.ndarray  # int32 [batch]: tokens each request held before the step
    table: tuple

    @property
    def prefill_tokens(self) -> int:  # the first rows of q / out are the prefill chunks'
        return int(self.new_indptr[len(self.prefills)])

    @property
    def total_tokens(self) -> int:
        return int(self.new_indptr[-1])

    def prefill_table(self):
        """qo_indptr [num_prefills + 1] and the page table of the prefilling requests."""
        n = len(self.prefills)
        kv_indptr, kv_indices, last, lens = self.table
        return (self.new_indptr[:n + 1], kv_indptr[:n + 1], kv_indices[:kv_indptr[n]],
                last[:n], lens[:n])

    def decode_table(self):
        """The page table of the decoding requests (their pages are the end of kv_indices)."""
        n = len(self.prefills)
        kv_indptr, kv_indices, last, lens = self.table
        return kv_indptr[n:] - kv_indptr[n], kv_indices[kv_indptr[n]:], last[n:], lens[n:]


# ----------------------------------------------------------------------------- the scheduler

def make_requests(sizes: Sizes, rng) -> list:
    arrivals = np.sort(rng.integers(0, sizes.steps * 2 // 3, sizes.num_requests))
    arrivals[0] = 0
    return [Request(i, int(a), int(rng.integers(*sizes.prompt_lens)),
                    int(rng.integers(*sizes.output_lens))) for i, a in enumerate(arrivals)]


def admit(waiting: list, live: list, cache, step: int, max_live: int) -> None:
    while waiting and waiting[0].arrival <= step and len(live) < max_live:
        req = waiting.pop(0)
        cache.add_sequence(req.id)  # no pages yet: they come with its tokens
        live.append(req)


def schedule(live: list, chunk: int) -> tuple:
    """This step's prefill chunks [(Request, tokens)], first come first served within the
    chunk budget, and its decodes [Request]."""
    decodes = [req for req in live if req.prefilled == req.prompt]
    prefills, budget = [], chunk
    for req in live:
        if req.prefilled < req.prompt and budget > 0:
            n = min(req.prompt - req.prefilled, budget)
            prefills.append((req, n))
            budget -= n
    return prefills, decodes


def allocate(cache, prefills: list, decodes: list) -> Step:
    """Grow every scheduled request by its new tokens (pages come off the free list) and read
    the page table of the step."""
    reqs = [req for req, _ in prefills] + decodes
    new = np.array([n for _, n in prefills] + [1] * len(decodes), np.int32)  # [batch]
    before = np.array([cache.seq_len(req.id) for req in reqs], np.int32)
    for req, length in zip(reqs, (before + new).tolist()):
        cache.grow(req.id, length)
    table = cache.page_table([req.id for req in reqs])
    return Step(prefills, decodes, cpattn.planner.cu_seqlens(new), before, table)


def retire(step: Step, live: list, cache) -> None:
    """Count the step's tokens; free the finished requests' pages."""
    for req, n in step.prefills:
        req.prefilled += n
        req.chunks += 1
        if req.prefilled == req.prompt:
            req.generated = 1  # the last prompt row's output gives the first token
    for req in step.decodes:
        req.generated += 1
    for req in [r for r in live if r.generated == r.output]:
        cache.free(req.id)
        live.remove(req)


# ----------------------------------------------------------------------------- attention

class KernelAttention:
    """The GPU path: BatchPrefillPaged for the prefill chunks, BatchDecode for the decodes;
    each planned once per step on the host, and run for every layer."""
    where = "BatchPrefillPaged and BatchDecode (CUDA kernels) on the GPU"

    def __init__(self, sizes: Sizes):
        self.sizes = sizes
        self.prefill, self.decode = cpattn.BatchPrefillPaged(), cpattn.BatchDecode()

    def plan(self, step: Step) -> None:
        s = self.sizes
        heads = (s.heads_qo, s.heads_kv, s.head_dim, s.page_size)
        if step.prefills:
            qo_indptr, kv_indptr, kv_indices, last, _ = step.prefill_table()
            self.prefill.plan(qo_indptr, kv_indptr, kv_indices, last, *heads, causal=True,
                              dtype="float16")
        if step.decodes:
            kv_indptr, kv_indices, last, _ = step.decode_table()
            self.decode.plan(kv_indptr, kv_indices, last, *heads, dtype="float16")

    def run(self, step: Step, q, k_pages, v_pages, out) -> None:
        """q, out [total_tokens, heads_qo, head_dim]: the prefill rows, then the decode rows."""
        t, total = step.prefill_tokens, step.total_tokens
        if step.prefills:
            self.prefill.run(q[:t], (k_pages, v_pages), out=out[:t])
        if step.decodes:
            self.decode.run(q[t:total], (k_pages, v_pages), out=out[t:total])


class ReferenceAttention:
    """The CPU path: the same calls through cpattn.reference on NumPy pools. The reference has
    no plan: it reads the page table on every call."""
    where = "the NumPy reference (cpattn.reference) on the CPU"

    def plan(self, step: Step) -> None:
        pass

    def run(self, step: Step, q, k_pages, v_pages, out) -> None:
        t, total = step.prefill_tokens, step.total_tokens
        if step.prefills:
            qo_indptr, kv_indptr, kv_indices, _, kv_lens = step.prefill_table()
            o, _ = reference.paged_prefill(q[:t], k_pages, v_pages, qo_indptr, kv_indptr,
                                           kv_indices, kv_lens=kv_lens, causal=True)
            out[:t] = o
        if step.decodes:
            kv_indptr, kv_indices, _, kv_lens = step.decode_table()
            o, _ = reference.paged_decode(q[t:total], k_pages, v_pages, kv_indptr, kv_indices,
                                          kv_lens=kv_lens)
            out[t:total] = o


# ----------------------------------------------------------------------------- the loop

@dataclass
class Buffers:
    """Device (or host) arrays of the loop; ``rows`` random rows stand in for the projections."""
    q_bank: object   # [rows, heads_qo, head_dim]
    k_bank: object   # [layers, rows, heads_kv, head_dim], and v_bank the same
    v_bank: object
    k_pools: object  # [layers, num_pages, page_size, heads_kv, head_dim], and v_pools the same
    v_pools: object
    out: object      # [layers, max_tokens, heads_qo, head_dim]: each layer's attention output


def make_buffers(s: Sizes, xp, rng) -> Buffers:
    rows = 2 * s.max_tokens + s.layers
    bank = lambda *shape: xp.asarray(rng.standard_normal(shape, np.float32).astype(np.float16))
    pool_shape = (s.layers, s.num_pages, s.page_size, s.heads_kv, s.head_dim)
    return Buffers(bank(rows, s.heads_qo, s.head_dim), bank(s.layers, rows, s.heads_kv, s.head_dim),
                   bank(s.layers, rows, s.heads_kv, s.head_dim),
                   # NaN in every slot: those no request owns must never reach an output
                   xp.full(pool_shape, np.nan, np.float16), xp.full(pool_shape, np.nan, np.float16),
                   xp.empty((s.layers, s.max_tokens, s.heads_qo, s.head_dim), np.float16))


def run_layers(step: Step, buf: Buffers, attention, off: int) -> tuple:
    """Every layer: append the step's new K/V to its pools, then attention. ``off`` picks the
    rows of the banks. Returns the host seconds spent in append and in run()."""
    append_s = run_s = 0.0
    total = step.total_tokens
    for layer in range(buf.k_pools.shape[0]):
        # q, k_new, v_new [total, H, D] would come from this layer's projections.
        q = buf.q_bank[off + layer:off + layer + total]
        k_new, v_new = buf.k_bank[layer, off:off + total], buf.v_bank[layer, off:off + total]
        t0 = time.perf_counter()
        cpattn.append_paged_kv(buf.k_pools[layer], buf.v_pools[layer], k_new, v_new,
                               step.new_indptr, step.table[0], step.table[1], step.kv_lens_before)
        t1 = time.perf_counter()
        attention.run(step, q, buf.k_pools[layer], buf.v_pools[layer], buf.out[layer])
        append_s, run_s = append_s + t1 - t0, run_s + time.perf_counter() - t1
    return append_s, run_s


def serve(s: Sizes, attention, xp, *, verify=False) -> dict:
    """Run the whole schedule; return the counts and host times. ``xp`` is cupy or numpy; with
    ``verify``, one step is checked (see check)."""
    rng = np.random.default_rng(0)
    requests = make_requests(s, rng)
    waiting, live, checked = list(requests), [], False
    buf = make_buffers(s, xp, rng)
    cache = cpattn.PagedKVCache(s.num_pages, s.page_size, s.heads_kv, s.head_dim, np.float16,
                                k_pages=buf.k_pools[0], v_pages=buf.v_pools[0])
    sync = xp.cuda.get_current_stream().synchronize if xp is not np else lambda: None
    stats = dict(prefill_tokens=0, decode_tokens=0, seconds=0.0, plan_us=[], run_us=[],
                 append_us=[], most_waiting=0)
    for step_no in range(s.steps):
        admit(waiting, live, cache, step_no, s.max_live)
        stats["most_waiting"] = max(stats["most_waiting"],
                                    sum(req.arrival <= step_no for req in waiting))
        if not live:
            continue
        t0 = time.perf_counter()
        step = allocate(cache, *schedule(live, s.chunk))
        t1 = time.perf_counter()
        attention.plan(step)
        t2 = time.perf_counter()
        off = (step_no * 37) % (buf.q_bank.shape[0] - s.max_tokens - s.layers)
        append_s, run_s = run_layers(step, buf, attention, off)
        sync()  # a serving loop samples the step's tokens here
        stats["seconds"] += time.perf_counter() - t0
        stats["plan_us"].append((t2 - t1) * 1e6)
        stats["run_us"].append(run_s * 1e6)
        stats["append_us"].append(append_s * 1e6)
        stats["prefill_tokens"] += step.prefill_tokens
        stats["decode_tokens"] += len(step.decodes)
        if verify and not checked and step.prefills and step.decodes and step.kv_lens_before[0]:
            # the first step that continues a chunked prefill next to decodes
            check(step, buf.q_bank[off + CHECK_LAYER:], buf.k_pools[CHECK_LAYER],
                  buf.v_pools[CHECK_LAYER], buf.out, xp)
            checked = True
        retire(step, live, cache)

    assert checked or not verify, "no step continued a chunked prefill next to decodes"
    stats.update(finished=s.num_requests - len(waiting) - len(live), live=len(live),
                 chunked=sum(req.chunks > 1 for req in requests))
    return stats


def check(step: Step, q, k_pages, v_pages, out, xp) -> None:
    """No output of the step, in any layer, may hold NaN (from a slot no request owns); and
    layer CHECK_LAYER's outputs are compared with one reference.paged_prefill call over the
    step's requests, on a sample: the last CHECK_ROWS new tokens of each request. (Causal is
    bottom-right aligned, so the last rows of a chunk see the same keys whatever rows come before
    them, and a decode is a chunk of one row.) Only the pages the step reads are copied to the
    host, their ids renumbered into that copy."""
    total = step.total_tokens
    assert bool(xp.isfinite(out[:, :total]).all()), "NaN from an unowned slot reached an output"
    host = getattr(xp, "asnumpy", np.asarray)
    ends = step.new_indptr[1:]
    kept = np.minimum(np.diff(step.new_indptr), CHECK_ROWS)         # sampled rows [batch]
    rows = np.concatenate([np.arange(e - n, e) for e, n in zip(ends, kept)])
    kv_indptr, kv_indices, _, kv_lens = step.table
    pages, local = np.unique(kv_indices, return_inverse=True)
    owned = xp.asarray(pages)
    ref, _ = reference.paged_prefill(host(q[:total])[rows], host(k_pages[owned]),
                                     host(v_pages[owned]), cpattn.planner.cu_seqlens(kept),
                                     kv_indptr, local.astype(np.int32), kv_lens=kv_lens,
                                     causal=True)
    got = host(out[CHECK_LAYER, :total])[rows].astype(np.float64)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"check, layer {CHECK_LAYER}: {len(step.prefills)} prefill chunks "
          f"({step.prefill_tokens} tokens, the first continuing a prompt) and "
          f"{len(step.decodes)} decodes, {len(rows)} rows against reference.paged_prefill: "
          f"relative error {err:.2e}")
    assert err < 2e-3, "the step differs from the reference"


def report(sizes: Sizes, stats: dict) -> None:
    s, secs = sizes, stats["seconds"]
    prefill, decode = stats["prefill_tokens"], stats["decode_tokens"]
    print(f"{s.steps} steps, {s.num_requests} requests ({stats['finished']} finished, "
          f"{stats['live']} live at the end, up to {stats['most_waiting']} kept waiting for a "
          f"slot; {stats['chunked']} prompts prefilled over several steps), {s.layers} layers, "
          f"{s.heads_qo}/{s.heads_kv} heads, head_dim {s.head_dim}, page_size {s.page_size}, "
          f"chunk budget {s.chunk} tokens, fp16")
    print(f"tokens/s: {(prefill + decode) / secs:,.0f} over {secs:.2f} s: prefill "
          f"{prefill / secs:,.0f} ({prefill} tokens), decode {decode / secs:,.0f} "
          f"({decode} tokens)")
    med = {key: np.median(stats[key]) for key in ("plan_us", "run_us", "append_us")}
    print(f"host us per step (median): plan {med['plan_us']:.0f} (both wrappers, once), run "
          f"{med['run_us']:.0f} ({med['run_us'] / s.layers:.0f} per layer), append "
          f"{med['append_us']:.0f} ({med['append_us'] / s.layers:.0f} per layer)")


def main() -> int:
    if cpattn.gpu_available():
        import cupy as xp
        sizes, attention = GPU_SIZES, KernelAttention(GPU_SIZES)
    else:
        xp, sizes, attention = np, CPU_SIZES, ReferenceAttention()
    print(f"serving_loop: {attention.where}" + ("" if xp is not np else
          " (no CUDA GPU found), at small sizes"))
    if xp is not np:
        # First pass: compiles / loads every kernel the schedule meets (later runs find them in
        # CuPy's cache) and checks one step; the second pass, the same schedule, is timed.
        serve(sizes, attention, xp, verify=True)
    stats = serve(sizes, attention, xp, verify=xp is np)
    report(sizes, stats)
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
