// mbarrier.cuh: shared-memory barriers (mbarrier) for producer / consumer pipelines, and the
// per-warpgroup register budgets of warp-specialised kernels (sm_90).
//
// A pipeline stage has a "full" barrier (the producer's copies into it landed) and an "empty"
// barrier (every consumer is done reading it). Each barrier counts arrivals per phase; a waiter
// names the parity of the phase it waits for. Round r of a stage (tile t = r * STAGES + stage)
// waits full with parity r & 1; the producer waits empty with parity (r & 1) ^ 1, which a fresh
// barrier satisfies at once (its "previous" phase, parity 1, counts as complete).
#pragma once
#include "common/mma.cuh"

namespace cpattn {

__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_addr(bar)), "r"(count));
}
// Makes initialised barriers visible to the other threads (then a __syncthreads).
__device__ __forceinline__ void mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned long long* bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n"
               :: "r"(smem_addr(bar)) : "memory");
}
// One arrival on bar once every cp.async this thread issued so far has landed (counted in the
// barrier's expected arrivals: .noinc).
__device__ __forceinline__ void cp_async_arrive(unsigned long long* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" :: "r"(smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" :: "r"(smem_addr(bar)), "r"(parity) : "memory");
}

// Named CTA barrier `id` (1..15; 0 is __syncthreads) over `threads` threads, e.g. the consumer
// warpgroups of a warp-specialised kernel without its producer.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}

// Registers per thread of the calling warpgroup (all its warps execute it): a producer gives
// registers back, consumers take them. setmaxnreg moves registers between the warpgroups of a
// CTA within what the launch gave it (launch_registers a thread: the register file shared by
// the CTA's threads, a multiple of 8); asking for more than was given back waits forever. With
// one producer and WARPGROUPS consumer warpgroups, the consumers get consumer_registers (at
// most 248) when the producer keeps PRODUCER; with CTAS CTAs an SM, each has 1 / CTAS of the file.
template <int WARPGROUPS, int CTAS = 1>
constexpr int launch_registers() {
  const int share = 65536 / CTAS / (128 * (WARPGROUPS + 1)) / 8 * 8;
  return share < 248 ? share : 248;
}
template <int WARPGROUPS, int PRODUCER, int CTAS = 1>
constexpr int consumer_registers() {
  const int share =
      (launch_registers<WARPGROUPS, CTAS>() * (WARPGROUPS + 1) - PRODUCER) / WARPGROUPS / 8 * 8;
  return share < 248 ? share : 248;
}
template <int REGS>
__device__ __forceinline__ void warpgroup_registers_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void warpgroup_registers_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGS));
}

}  // namespace cpattn
