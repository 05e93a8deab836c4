// fake_cublas.cpp: a stand-in libcublas.so.13 for the CPU simulation (test/cuda/sim/run.sh): the three
// entry points kernels/cuda/gemm.cu resolves, with cublasSgemm_v2 as a plain column-major triple loop
// honouring op / ld exactly as documented by cuBLAS (so the row-major <-> column-major operand mapping
// in gemm.cu is exercised). Rejects ld values that real cuBLAS rejects (status 7, INVALID_VALUE).
extern "C" {
int cublasCreate_v2(void** h) {
  static int dummy;
  *h = &dummy;
  return 0;
}
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasSgemm_v2(void*, int ta, int tb, int m, int n, int k, const float* alpha, const float* A, int lda, const float* B, int ldb,
                   const float* beta, float* C, int ldc) {
  const int arows = ta == 0 ? m : k, brows = tb == 0 ? k : n;
  if (m < 0 || n < 0 || k < 0 || lda < (arows > 1 ? arows : 1) || ldb < (brows > 1 ? brows : 1) || ldc < (m > 1 ? m : 1)) return 7;
  for (int i = 0; i < m; i++)
    for (int j = 0; j < n; j++) {
      float acc = 0;
      for (int p = 0; p < k; p++) {
        const float a = ta == 0 ? A[i + p * lda] : A[p + i * lda];  // op(A)[i, p]
        const float b = tb == 0 ? B[p + j * ldb] : B[j + p * ldb];  // op(B)[p, j]
        acc += a * b;
      }
      C[i + j * ldc] = *alpha * acc + (*beta == 0 ? 0.0f : *beta * C[i + j * ldc]);
    }
  return 0;
}
}
