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

// Registers per thread of the calling warpgroup (all its warps execute it): a producer gives
// registers back, consumers take them (the sum over warpgroups must fit the register file).
template <int REGS>
__device__ __forceinline__ void warpgroup_registers_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void warpgroup_registers_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGS));
}

}  // namespace cpattn
