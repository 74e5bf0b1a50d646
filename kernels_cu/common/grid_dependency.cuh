// Programmatic dependent launch (sm_90 on; _core.DirectLaunch launches with it there): a grid
// may start while the grid before it in the stream is still running, so its launch and the
// set-up of its CTAs overlap that grid's tail. allow_dependent_grids() lets the next grid launch
// once every CTA of this one has called it (or exited); that grid waits in its turn.
// A thread calls wait_for_prior_grids() before its first global access other than a read of the
// plan: the prior grid has then completed and its writes are visible. The plan (work items, page
// tables, indptr arrays) is written by host copies only, queued before any kernel this grid can
// overlap, so it may be read first (the work's first page ids fetched while that grid ends);
// Q, K, V, outputs and partial states may be that grid's, and wait.
// Before sm_90 (and in a launch without the attribute) both are no-ops.
#pragma once

namespace cpattn {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Both, at the start of a kernel that reads no plan first.
__device__ __forceinline__ void enter_dependent_grid() {
  wait_for_prior_grids();
  allow_dependent_grids();
}

}  // namespace cpattn
