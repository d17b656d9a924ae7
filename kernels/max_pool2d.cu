// Max pooling: the forward records each window's winner, the backward gathers
// for every input pixel the gradients of the windows that chose it.
// Layouts: x, dx (N,C,H,W); y, dy, indices (N,C,P,Q) contiguous; indices are the
// flat position h*W + w of the winner in its (n,c) plane, as in PyTorch.

// The window of (p,q) starts at (p*sh - ph, q*sw - pw); its cells outside the
// input are skipped (they are -inf padding). A cell wins when it is larger
// than the best so far or is NaN: the first maximum in row-major order wins,
// and a NaN beats every number (PyTorch's rule, the last NaN among several).
// A window of -inf only keeps its first cell inside the input.
template <typename T> __device__ T negative_infinity();
template <> __device__ float negative_infinity<float>() { return __int_as_float((int)0xff800000u); }
template <> __device__ double negative_infinity<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

template <typename T>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y,
                                   long long* __restrict__ indices, int N, int C, int H, int W,
                                   int R, int S, int P, int Q, int sh, int sw, int ph, int pw) {
    const long long total = (long long)N * C * P * Q;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int q = (int)(i % Q);
        const int p = (int)((i / Q) % P);
        const long long plane = i / ((long long)P * Q);
        const T* xp = x + plane * H * W;
        const int h0 = p * sh - ph, w0 = q * sw - pw;
        const int hs = h0 > 0 ? h0 : 0, ws = w0 > 0 ? w0 : 0;
        const int he = h0 + R < H ? h0 + R : H, we = w0 + S < W ? w0 + S : W;
        T best = negative_infinity<T>();
        long long best_at = (long long)hs * W + ws;
        for (int h = hs; h < he; ++h) {
            for (int w = ws; w < we; ++w) {
                const T v = xp[h * W + w];
                if (v > best || isnan(v)) {
                    best = v;
                    best_at = (long long)h * W + w;
                }
            }
        }
        y[i] = best;
        indices[i] = best_at;
    }
}

// dx[n,c,h,w] = sum of dy[n,c,p,q] over the windows (p,q) that cover (h,w) and
// whose recorded winner is (h,w). Window p covers h when
// p*sh - ph <= h < p*sh - ph + R, so p runs from ceil((h + ph - R + 1) / sh)
// to floor((h + ph) / sh). One thread per input pixel, p-then-q order.
template <typename T>
__global__ void max_pool2d_backward(const T* __restrict__ dy, const long long* __restrict__ indices,
                                    T* __restrict__ dx, int N, int C, int H, int W, int R, int S,
                                    int P, int Q, int sh, int sw, int ph, int pw) {
    const long long total = (long long)N * C * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const long long plane = i / ((long long)H * W);
        const long long here = (long long)h * W + w;
        const int hp = h + ph, wp = w + pw;
        const int p_lo = hp - R + 1 > 0 ? (hp - R + 1 + sh - 1) / sh : 0;
        const int q_lo = wp - S + 1 > 0 ? (wp - S + 1 + sw - 1) / sw : 0;
        const int p_hi = hp / sh < P - 1 ? hp / sh : P - 1;
        const int q_hi = wp / sw < Q - 1 ? wp / sw : Q - 1;
        T acc = 0;
        for (int p = p_lo; p <= p_hi; ++p) {
            for (int q = q_lo; q <= q_hi; ++q) {
                const long long o = plane * P * Q + (long long)p * Q + q;
                if (indices[o] == here) acc += dy[o];
            }
        }
        dx[i] = acc;
    }
}
