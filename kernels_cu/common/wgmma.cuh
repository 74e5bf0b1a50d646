// wgmma.cuh: Hopper (sm_90a) warpgroup matrix products and the shared-memory layout they read.
//
// A warpgroup (4 consecutive warps, the first a multiple of 4) computes D[64 x N] += A[64 x 16]
// B[16 x N] with wgmma.mma_async. D is fp32 in registers, laid out as 4 mma.sync C fragments
// stacked: warp i of the group holds rows 16i..16i+15, and d[n][e] of a thread is the C fragment
// element e of columns 8n..8n+7 (mma.cuh). A comes from shared memory (a descriptor) or from
// registers in mma.sync's A fragment layout; B always from shared memory.
//
// Tiles in shared memory use the 128-byte swizzle (SwizzledBlocks): a tile of ROWS rows of 16-bit
// elements is cut into column blocks of 64 elements; block b holds rows at 128-byte strides
// (ROWS * 128 bytes), and 16-byte chunk c of row r sits at chunk (c ^ r % 8) of its row, the
// pattern the hardware applies on address bits [4, 7) ^ [7, 10) when a descriptor says "128B
// swizzle". Blocks start 1024-byte aligned. The same tile serves as a K-major operand (rows are
// M or N, the 64 elements along K: Q and K in Q K^T) and as an MN-major one (rows are K, elements
// along N: V in P V, read transposed).
#pragma once
#include "common/mma.cuh"

namespace cpattn {

template <int ROWS>
struct SwizzledBlocks {
  static_assert(ROWS % 8 == 0, "128-byte swizzle atoms are 8 rows");
  __device__ __forceinline__ static int at(int row, int chunk) {
    return (chunk >> 3) * ROWS * 8 + row * 8 + ((chunk & 7) ^ (row & 7));
  }
};

// Shared-memory matrix descriptor (PTX ISA, "matrix descriptor"): start address, leading and
// stride byte offsets (all >> 4), and the 128B swizzle mode in bits 62-63.
//   K-major (SwizzledBlocks rows are M / N): stride = 1024 (next 8 rows); leading unused.
//   MN-major (rows are K): stride = 1024 (next 8 k), leading = bytes between 64-wide N blocks.
__device__ __forceinline__ unsigned long long smem_desc(const void* start, unsigned leading_bytes,
                                                        unsigned stride_bytes) {
  const unsigned long long addr = smem_addr(start);
  return ((addr & 0x3FFFF) >> 4) | (static_cast<unsigned long long>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<unsigned long long>((stride_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// Order: wgmma_fence() before the first product of a batch (and after registers it reads or
// accumulates into were written); wgmma_commit() after the batch; wgmma_wait<N>() until at most
// N batches are in flight; then fence_operands() on the results before reading them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// The registers of d are (re)defined here for the compiler: reads of them stay after the wait.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[n][e]) :: "memory");
}
// Shared memory written through the generic proxy (cp.async, stores), read next by wgmma
// (async proxy): each writing thread fences before the barrier that publishes it.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#define CPATTN_ACC4(d, n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#define CPATTN_ACC16(d, n) CPATTN_ACC4(d, n), CPATTN_ACC4(d, n + 1), CPATTN_ACC4(d, n + 2), CPATTN_ACC4(d, n + 3)
#define CPATTN_ACC32(d, n) CPATTN_ACC16(d, n), CPATTN_ACC16(d, n + 4)
#define CPATTN_ACC64(d) CPATTN_ACC32(d, 0), CPATTN_ACC32(d, 8)
#define CPATTN_ACC128(d) CPATTN_ACC32(d, 0), CPATTN_ACC32(d, 8), CPATTN_ACC32(d, 16), CPATTN_ACC32(d, 24)
#define CPATTN_REGS16 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define CPATTN_REGS32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define CPATTN_REGS64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, " \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define CPATTN_REGS128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, " \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, " \
  "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, " \
  "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, " \
  "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, " \
  "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"

// D (+)= A B for A [64 x 16] and B [16 x N], B in shared memory (K-major, or MN-major read
// transposed when TRANS_B), A in shared memory (K-major: ss) or in registers (mma.sync's A
// fragment of the warp's 16 rows: rs). accumulate = false overwrites D (no zeroing needed).
template <typename T, int N> struct Wgmma;

// One specialisation per element type and N; the operand numbers follow the N / 2 accumulators.
#define CPATTN_DEFINE_WGMMA(TYPE, PTX_TYPES, N, REGS, ACC, SS_PRED, SS_ARGS, RS_PRED, RS_ARGS)  \
  template <>                                                                                  \
  struct Wgmma<TYPE, N> {                                                                      \
    template <int TRANS_B = 0>                                                                 \
    __device__ __forceinline__ static void ss(float (&d)[N / 8][4], unsigned long long desc_a, \
                                              unsigned long long desc_b, bool accumulate) {    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_PRED ", 0;\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32" PTX_TYPES " " REGS SS_ARGS  \
                   ";\n}\n"                                                                     \
                   : ACC : "l"(desc_a), "l"(desc_b), "r"(accumulate ? 1 : 0), "n"(TRANS_B));   \
    }                                                                                          \
    template <int TRANS_B>                                                                     \
    __device__ __forceinline__ static void rs(float (&d)[N / 8][4], const unsigned (&a)[4],    \
                                              unsigned long long desc_b, bool accumulate) {    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_PRED ", 0;\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32" PTX_TYPES " " REGS RS_ARGS  \
                   ";\n}\n"                                                                     \
                   : ACC                                                                       \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),                  \
                     "r"(accumulate ? 1 : 0), "n"(TRANS_B));                                   \
    }                                                                                          \
  };
#define CPATTN_DEFINE_WGMMA_TYPE(TYPE, PTX_TYPES) \
  CPATTN_DEFINE_WGMMA(TYPE, PTX_TYPES, 32, CPATTN_REGS16, CPATTN_ACC16(d, 0), "%18", \
                      ", %16, %17, p, 1, 1, 0, %19", "%21", ", {%16, %17, %18, %19}, %20, p, 1, 1, %22") \
  CPATTN_DEFINE_WGMMA(TYPE, PTX_TYPES, 64, CPATTN_REGS32, CPATTN_ACC32(d, 0), "%34", \
                      ", %32, %33, p, 1, 1, 0, %35", "%37", ", {%32, %33, %34, %35}, %36, p, 1, 1, %38") \
  CPATTN_DEFINE_WGMMA(TYPE, PTX_TYPES, 128, CPATTN_REGS64, CPATTN_ACC64(d), "%66", \
                      ", %64, %65, p, 1, 1, 0, %67", "%69", ", {%64, %65, %66, %67}, %68, p, 1, 1, %70") \
  CPATTN_DEFINE_WGMMA(TYPE, PTX_TYPES, 256, CPATTN_REGS128, CPATTN_ACC128(d), "%130", \
                      ", %128, %129, p, 1, 1, 0, %131", "%133", ", {%128, %129, %130, %131}, %132, p, 1, 1, %134")

CPATTN_DEFINE_WGMMA_TYPE(half, ".f16.f16")
CPATTN_DEFINE_WGMMA_TYPE(__nv_bfloat16, ".bf16.bf16")

// S [64 x N] = A B^T over DIM dims, A and B K-major SwizzledBlocks tiles (64 dims a block) from
// descriptors: the A block holds A_ROWS rows, the B block B_ROWS (A's 64 rows and B's N start at
// the descriptors). k-step kk reads dims [16 kk, 16 kk + 16): block kk / 4, 32 bytes into its rows
// (descriptor addresses count 16 bytes). Issued, committed and waited for.
template <typename T, int N, int DIM, int A_ROWS, int B_ROWS>
__device__ __forceinline__ void kmajor_scores(float (&s)[N / 8][4], unsigned long long a_desc,
                                              unsigned long long b_desc) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < DIM / 16; ++kk) {
    const int block = kk / 4, chunk = (kk % 4) * 2;
    Wgmma<T, N>::ss(s, a_desc + block * A_ROWS * 8 + chunk, b_desc + block * B_ROWS * 8 + chunk,
                    kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_operands(s);
}

}  // namespace cpattn
