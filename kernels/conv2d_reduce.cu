// The fixed-order reductions that finish a convolution's gradients:
// the weight gradient's split-K slices, and the bias gradient. No atomics: every
// sum runs in one order that depends on the shape alone, so results are bitwise
// repeatable. Layouts: dy (N,K,P,Q); partial (slices, count); contiguous.

// REDUCE_LANES, the slice lanes per output in conv2d_sum_slices (blockDim.y), comes
// from the loader as a -D option (gpucnn/backends/cuda/conv.py), and only from there.
#ifndef REDUCE_LANES
#error "kernels/conv2d_reduce.cu takes REDUCE_LANES as a -D option: compile it through gpucnn/backends/cuda/conv.py (compile_units)"
#endif

// out[o] = sum over slices z of partial[z][o]: lane y of a block adds the slices
// y, y+LANES, ... in order, then lane 0 adds the lanes' sums in order.
// Block (32, REDUCE_LANES): 32 consecutive outputs, so the reads coalesce.
// Grid (ceil(count/32)).
template <typename T>
__global__ void conv2d_sum_slices(const T* __restrict__ partial, T* __restrict__ out,
                                  long long count, int slices) {
    extern __shared__ unsigned char smem[];
    T* lanes = reinterpret_cast<T*>(smem);  // [REDUCE_LANES][32]
    const long long o = (long long)blockIdx.x * 32 + threadIdx.x;
    T acc = 0;
    if (o < count)
        for (int z = threadIdx.y; z < slices; z += REDUCE_LANES) acc += partial[z * count + o];
    lanes[threadIdx.y * 32 + threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && o < count) {
        T total = lanes[threadIdx.x];
        for (int y = 1; y < REDUCE_LANES; ++y) total += lanes[y * 32 + threadIdx.x];
        out[o] = total;
    }
}

// partial[z][k] = sum of dy[n,k,p,q] over the z-th of `slices` consecutive
// ranges of (n,p,q) (each slice_len long), by a block of blockDim.x threads
// (a power of two): thread t adds the range's elements t, t+blockDim.x, ... in
// order, then a fixed tree adds the threads' sums. Grid (slices, K):
// K*slices blocks keep the GPU busy even when K is small.
template <typename T>
__global__ void conv2d_backward_bias(const T* __restrict__ dy, T* __restrict__ partial, int N,
                                     int K, long long PQ, long long slice_len) {
    extern __shared__ unsigned char smem[];
    T* sums = reinterpret_cast<T*>(smem);  // [blockDim.x]
    const int k = blockIdx.y, t = threadIdx.x;
    const long long NPQ = N * PQ, begin = blockIdx.x * slice_len;
    const long long end = begin + slice_len < NPQ ? begin + slice_len : NPQ;
    T acc = 0;
    long long i = begin + t;
    long long n = i / PQ, pq = i - n * PQ;  // advanced without division below
    const long long n_step = blockDim.x / PQ, pq_step = blockDim.x - n_step * PQ;
    for (; i < end; i += blockDim.x) {
        acc += dy[(n * K + k) * PQ + pq];
        pq += pq_step;
        n += n_step;
        if (pq >= PQ) { pq -= PQ; ++n; }
    }
    sums[t] = acc;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) sums[t] += sums[t + half];
        __syncthreads();
    }
    if (t == 0) partial[(long long)blockIdx.x * K + k] = sums[0];
}
