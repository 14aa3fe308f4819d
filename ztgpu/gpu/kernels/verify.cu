// ztgpu's GPU memory verify kernel: the source of verify.ptx (kept in the
// package; tests/test_cuda_wipe.py checks the two are in sync where nvcc is
// installed). Built with:
//   nvcc -ptx -arch=compute_75 -O3 -o verify.ptx verify.cu
// and the PTX ISA version lowered to 7.5 (CUDA 11.5 drivers and later JIT it),
// which the instructions used here allow.
//
// Each thread checks 16-byte words with a grid-stride loop and folds what
// does not equal `expect`: how many 32-bit words differ, the lowest index of
// one that differs, and an order-independent digest (xor of index and value)
// so that two runs over the same memory agree on the evidence.

extern "C" __global__ void ztgpu_verify(const uint4 *words, unsigned long long n4,
                                        unsigned int expect, unsigned long long *result)
{
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long bad = 0, first = ~0ull, digest = 0;
    for (; i < n4; i += stride) {
        const uint4 v = words[i];
        const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            if (w[k] != expect) {
                const unsigned long long at = i * 4 + k;
                bad++;
                first = at < first ? at : first;
                digest ^= (at * 0x9E3779B97F4A7C15ull) ^ ((unsigned long long)w[k] << 17);
            }
        }
    }
    if (bad) {
        atomicAdd(&result[0], bad);
        atomicMin(&result[1], first);
        atomicXor(&result[2], digest);
    }
}
