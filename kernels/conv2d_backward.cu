// Convolution backward passes as gathers: every output element is computed by
// the thread (or block) that owns it, so no atomics and a fixed summation order.
// Layouts: dy (N,K,P,Q), x and dx (N,C,H,W), w and dw (K,C/groups,R,S), all contiguous.
// pt/pl are the top/left zero padding; bottom/right padding needs no argument
// because positions past the input simply contribute nothing.

// A block-wide sum in a fixed tree order; blockDim.x must be a power of two.
// smem holds blockDim.x elements of T. Every thread returns the total.
template <typename T>
__device__ T block_sum(T v, T* smem) {
    const int tid = threadIdx.x;
    smem[tid] = v;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (tid < half) smem[tid] += smem[tid + half];
        __syncthreads();
    }
    T total = smem[0];
    __syncthreads();  // smem may be reused by the caller's next round
    return total;
}

// dx[n,c,h,w] = sum over k in c's group and taps (r,s) whose output position
// p = (h + pt - r*dh) / sh (exact division, 0 <= p < P), likewise q, of
// dy[n,k,p,q] * w[k, c - group*Cg, r, s]: the transposed convolution with the
// 180-degree-rotated filters. One thread per dx element, grid-stride.
template <typename T>
__global__ void conv2d_backward_data(const T* __restrict__ dy, const T* __restrict__ w,
                                     T* __restrict__ dx, int N, int C, int H, int W, int K,
                                     int R, int S, int P, int Q, int sh, int sw, int pt, int pl,
                                     int dh, int dw, int groups) {
    const int Cg = C / groups, Kg = K / groups;
    const long long total = (long long)N * C * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int x_w = (int)(i % W);
        const int x_h = (int)((i / W) % H);
        const int c = (int)((i / ((long long)W * H)) % C);
        const int n = (int)(i / ((long long)W * H * C));
        const int group = c / Cg, cg = c - group * Cg;
        T acc = 0;
        for (int r = 0; r < R; ++r) {
            const int th = x_h + pt - r * dh;
            if (th < 0) break;  // th only shrinks as r grows
            if (th % sh) continue;
            const int p = th / sh;
            if (p >= P) continue;
            for (int s = 0; s < S; ++s) {
                const int tw = x_w + pl - s * dw;
                if (tw < 0) break;
                if (tw % sw) continue;
                const int q = tw / sw;
                if (q >= Q) continue;
                const T* dy_at = dy + ((long long)n * K + group * Kg) * P * Q + p * Q + q;
                const T* w_at = w + ((long long)(group * Kg) * Cg + cg) * R * S + r * S + s;
                for (int k = 0; k < Kg; ++k)
                    acc += dy_at[(long long)k * P * Q] * w_at[(long long)k * Cg * R * S];
            }
        }
        dx[i] = acc;
    }
}

// dw as a matrix product, within each group: dw[k][j] = sum_i dy[k][i] * cols[i][j],
// i = (n,p,q) and j = (cg,r,s), cols[i][j] = x[n, group*Cg + cg, p*sh - pt + r*dh,
// q*sw - pl + s*dw] (zero outside the input), gathered on the fly (implicit im2col).
// A block owns a FILTER_TILE x FILTER_TILE tile of (k, j) for one slice of the i
// range (blockIdx.z); its 256 threads (blockDim.x must be 256) hold 4x4 outputs
// each and step through the slice FILTER_STEP values of i at a time through
// shared memory. The slice's sum goes to partial[slice][group*Kg + k][j];
// conv2d_backward_filter_reduce then adds the slices in order. Each output is
// summed in one fixed order: bitwise repeatable, no atomics.
constexpr int FILTER_TILE = 64;
constexpr int FILTER_STEP = 16;

template <typename T>
__global__ void conv2d_backward_filter(const T* __restrict__ dy, const T* __restrict__ x,
                                       T* __restrict__ partial, int N, int C, int H, int W,
                                       int K, int R, int S, int P, int Q, int sh, int sw, int pt,
                                       int pl, int dh, int dw, int groups, long long slice) {
    extern __shared__ unsigned char smem[];
    T* a = reinterpret_cast<T*>(smem);      // a[ii * FILTER_TILE + kk] = dy[k0 + kk][i0 + ii]
    T* b = a + FILTER_STEP * FILTER_TILE;   // b[ii * FILTER_TILE + jj] = cols[i0 + ii][j0 + jj]
    const int Cg = C / groups, Kg = K / groups, RS = R * S, J = Cg * RS, PQ = P * Q;
    const long long NPQ = (long long)N * PQ;
    const int k_tiles = (Kg + FILTER_TILE - 1) / FILTER_TILE;
    const int group = blockIdx.y / k_tiles;
    const int k0 = (blockIdx.y % k_tiles) * FILTER_TILE, j0 = blockIdx.x * FILTER_TILE;
    const long long i_begin = blockIdx.z * slice;
    const long long i_end = i_begin + slice < NPQ ? i_begin + slice : NPQ;
    const int row = (threadIdx.x / 16) * 4, col = (threadIdx.x % 16) * 4;
    T acc[4][4];
    for (int u = 0; u < 4; ++u)
        for (int v = 0; v < 4; ++v) acc[u][v] = 0;

    for (long long i0 = i_begin; i0 < i_end; i0 += FILTER_STEP) {
        // Consecutive threads take consecutive i, i.e. neighbouring pixels.
        for (int e = threadIdx.x; e < FILTER_STEP * FILTER_TILE; e += blockDim.x) {
            const int ii = e % FILTER_STEP, t = e / FILTER_STEP;
            const long long i = i0 + ii;
            T dy_v = 0, x_v = 0;
            if (i < i_end) {
                const int n = (int)(i / PQ), pq = (int)(i - (long long)n * PQ);
                const int k = k0 + t, j = j0 + t;
                if (k < Kg) dy_v = dy[((long long)n * K + group * Kg + k) * PQ + pq];
                if (j < J) {
                    const int cg = j / RS, rs = j - cg * RS, r = rs / S, s = rs - r * S;
                    const int p = pq / Q, q = pq - p * Q;
                    const int h = p * sh - pt + r * dh, w = q * sw - pl + s * dw;
                    if (h >= 0 && h < H && w >= 0 && w < W)
                        x_v = x[(((long long)n * C + group * Cg + cg) * H + h) * W + w];
                }
            }
            a[ii * FILTER_TILE + t] = dy_v;
            b[ii * FILTER_TILE + t] = x_v;
        }
        __syncthreads();
        for (int ii = 0; ii < FILTER_STEP; ++ii) {
            T av[4], bv[4];
            for (int u = 0; u < 4; ++u) av[u] = a[ii * FILTER_TILE + row + u];
            for (int v = 0; v < 4; ++v) bv[v] = b[ii * FILTER_TILE + col + v];
            for (int u = 0; u < 4; ++u)
                for (int v = 0; v < 4; ++v) acc[u][v] += av[u] * bv[v];
        }
        __syncthreads();
    }
    for (int u = 0; u < 4; ++u) {
        const int k = k0 + row + u;
        if (k >= Kg) break;
        for (int v = 0; v < 4; ++v) {
            const int j = j0 + col + v;
            if (j < J) partial[((long long)blockIdx.z * K + group * Kg + k) * J + j] = acc[u][v];
        }
    }
}

// dw[o] = sum over the slices z = 0, 1, ... of partial[z][o], in that order.
template <typename T>
__global__ void conv2d_backward_filter_reduce(const T* __restrict__ partial, T* __restrict__ dwt,
                                              long long count, int slices) {
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < count;
         o += (long long)gridDim.x * blockDim.x) {
        T acc = 0;
        for (int z = 0; z < slices; ++z) acc += partial[z * count + o];
        dwt[o] = acc;
    }
}

// db[k] = sum over (n,p,q) of dy[n,k,p,q]; one block per k, the same fixed order.
template <typename T>
__global__ void conv2d_backward_bias(const T* __restrict__ dy, T* __restrict__ db, int N, int K,
                                     int PQ) {
    extern __shared__ unsigned char smem[];
    const long long NPQ = (long long)N * PQ;
    for (int k = blockIdx.x; k < K; k += gridDim.x) {
        T acc = 0;
        for (long long j = threadIdx.x; j < NPQ; j += blockDim.x) {
            const long long n = j / PQ;
            acc += dy[(n * K + k) * PQ + (j - n * PQ)];
        }
        const T total = block_sum(acc, reinterpret_cast<T*>(smem));
        if (threadIdx.x == 0) db[k] = total;
    }
}
