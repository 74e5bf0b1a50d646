// mma.cuh: tensor-core and async-copy building blocks for sm_80 and newer.
//
// Fragments follow the PTX ISA layout of mma.m16n8k16 (g = lane / 4, c = lane % 4):
//   A (16x16, row-major) a0..a3: (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)
//   B (16x8, "col")      b0, b1: (k = 2c..2c+1, n = g), (k = 2c+8.., n = g)
//   C (16x8, fp32)       c0..c3: (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)
// Shared-memory tiles are rows of 16-byte chunks, swizzled (chunk ^ row % 8) so that the eight
// rows an ldmatrix reads at one chunk column fall in eight different bank groups.
#pragma once
#include "common/dtypes.cuh"

namespace cpattn {

// Offset, in 16-byte chunks, of chunk `chunk` of row `row` in a swizzled tile of CHUNKS per row.
template <int CHUNKS>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  static_assert(CHUNKS % 8 == 0, "swizzled rows need a multiple of 8 chunks (head_dim % 64 == 0)");
  return row * CHUNKS + (chunk ^ (row & 7));
}

// The layout above as a type, for code shared between tile layouts (kv_tiles.cuh).
template <int CHUNKS>
struct SwizzledRows {
  __device__ __forceinline__ static int at(int row, int chunk) { return swizzle<CHUNKS>(row, chunk); }
};

__device__ __forceinline__ unsigned smem_addr(const void* ptr) {
  return static_cast<unsigned>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy that bypasses registers; when !valid, writes 16 zero bytes and
// reads nothing (the source address is then never dereferenced).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(smem)), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(smem)));
}

// c += a * b on one m16n8k16 tile, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1);
template <>
__device__ __forceinline__ void mma_16816<half>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4],
                                                         unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed in 32 bits (lower address first): an A-fragment register.
template <typename T> __device__ __forceinline__ unsigned pack_pair(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack_pair<half>(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack_pair<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// The A fragment (16 rows x k 16..16+15 of kt) made of the C fragments c[2 kt], c[2 kt + 1]
// of a previous product: how P = softmax(S) feeds P V without leaving registers.
template <typename T, int N>
__device__ __forceinline__ void c_to_a(const float (&c)[N][4], int kt, unsigned (&a)[4]) {
  a[0] = pack_pair<T>(c[2 * kt][0], c[2 * kt][1]);
  a[1] = pack_pair<T>(c[2 * kt][2], c[2 * kt][3]);
  a[2] = pack_pair<T>(c[2 * kt + 1][0], c[2 * kt + 1][1]);
  a[3] = pack_pair<T>(c[2 * kt + 1][2], c[2 * kt + 1][3]);
}

// Max over row g + 8h of C fragments c[n][e] (elements 2h, 2h + 1 of each 8 columns, across
// the quad's four threads): the row's max over all N * 8 columns, in every thread of the quad.
template <int N>
__device__ __forceinline__ float quad_row_max(const float (&c)[N][4], int h) {
  float mx = -__int_as_float(0x7f800000);  // -inf
#pragma unroll
  for (int n = 0; n < N; ++n) mx = fmaxf(mx, fmaxf(c[n][2 * h], c[n][2 * h + 1]));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
  return fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
}

// Keep the keys [lo[h], hi[h]) of row g + 8h of C fragments c[n][e] and set the others to -inf
// (selected, never added: -inf + NaN stays NaN). Key indices are relative to the fragment's first
// column: c[n][e] is key n * 8 + 2 (lane % 4) + e % 2, so one compare pair a score.
template <int N>
__device__ __forceinline__ void mask_outside(float (&c)[N][4], const int (&lo)[2],
                                             const int (&hi)[2]) {
  const int col = 2 * (threadIdx.x % 4);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int first = lo[h] - col, end = hi[h] - col;  // bounds on n * 8 + e % 2
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = n * 8 + e;
        c[n][2 * h + e] = (j >= first && j < end) ? c[n][2 * h + e] : -__int_as_float(0x7f800000);
      }
  }
}

// Store two adjacent elements (ptr 4-byte aligned for 2-byte T, 8-byte for float).
template <typename T>
__device__ __forceinline__ void store_pair(T* ptr, float lo, float hi) {
  *reinterpret_cast<unsigned*>(ptr) = pack_pair<T>(lo, hi);
}
template <>
__device__ __forceinline__ void store_pair<float>(float* ptr, float lo, float hi) {
  *reinterpret_cast<float2*>(ptr) = make_float2(lo, hi);
}

}  // namespace cpattn
