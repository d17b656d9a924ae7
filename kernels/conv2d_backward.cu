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

// dw[k,cg,r,s] = sum over (n,p,q) of dy[n,k,p,q] * x[n, group*Cg + cg, p*sh - pt + r*dh,
// q*sw - pl + s*dw] (zero outside the input). One block per dw element; thread t
// sums the (n,p,q) with index = t mod blockDim.x in increasing order, then the
// block adds the partial sums in a fixed tree: bitwise repeatable.
template <typename T>
__global__ void conv2d_backward_filter(const T* __restrict__ dy, const T* __restrict__ x,
                                       T* __restrict__ dwt, int N, int C, int H, int W, int K,
                                       int R, int S, int P, int Q, int sh, int sw, int pt, int pl,
                                       int dh, int dw, int groups) {
    extern __shared__ unsigned char smem[];
    const int Cg = C / groups, Kg = K / groups;
    const long long n_out = (long long)K * Cg * R * S;
    const int PQ = P * Q;
    const long long NPQ = (long long)N * PQ;
    for (long long o = blockIdx.x; o < n_out; o += gridDim.x) {
        const int s = (int)(o % S);
        const int r = (int)((o / S) % R);
        const int cg = (int)((o / ((long long)S * R)) % Cg);
        const int k = (int)(o / ((long long)S * R * Cg));
        const int c = (k / Kg) * Cg + cg;
        T acc = 0;
        for (long long j = threadIdx.x; j < NPQ; j += blockDim.x) {
            const int n = (int)(j / PQ);
            const int pq = (int)(j - (long long)n * PQ);
            const int p = pq / Q, q = pq - p * Q;
            const int h = p * sh - pt + r * dh, wi = q * sw - pl + s * dw;
            if (h < 0 || h >= H || wi < 0 || wi >= W) continue;
            acc += dy[((long long)n * K + k) * PQ + pq] * x[(((long long)n * C + c) * H + h) * W + wi];
        }
        const T total = block_sum(acc, reinterpret_cast<T*>(smem));
        if (threadIdx.x == 0) dwt[o] = total;
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
