// dtypes.cuh: the element types kernels take, and 16-byte vector moves between them and float.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cpattn {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<half>(half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ half from_float<half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements of T in one 16-byte vector: the unit of every global load and store.
template <typename T> struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
  static_assert(16 % sizeof(T) == 0, "element size must divide 16 bytes");
};

// The unsigned type moving BYTES bytes at once.
template <int BYTES> struct Raw;
template <> struct Raw<4> { using type = unsigned; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<16> { using type = uint4; };

// Load N elements (N * sizeof(T) bytes, aligned to that) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[N]) {
  union { typename Raw<N * sizeof(T)>::type raw; T elems[N]; } u;
  u.raw = *reinterpret_cast<const typename Raw<N * sizeof(T)>::type*>(ptr);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(u.elems[i]);
}

// Store N floats, rounded to T, in accesses of N * sizeof(T) bytes, or 16 when that is more.
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[N]) {
  constexpr int PIECE = N * sizeof(T) > 16 ? 16 / sizeof(T) : N;  // elements an access
  static_assert(N % PIECE == 0, "whole 16-byte pieces");
#pragma unroll
  for (int j = 0; j < N; j += PIECE) {
    union { typename Raw<PIECE * sizeof(T)>::type raw; T elems[PIECE]; } u;
#pragma unroll
    for (int i = 0; i < PIECE; ++i) u.elems[i] = from_float<T>(in[j + i]);
    *reinterpret_cast<typename Raw<PIECE * sizeof(T)>::type*>(ptr + j) = u.raw;
  }
}

}  // namespace cpattn
