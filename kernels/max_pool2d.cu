// Max pooling: the forward records each window's winner, the backward gathers
// for every input pixel the gradients of the windows that chose it.
// Layouts: x, dx (N,C,H,W); y, dy, indices (N,C,P,Q) contiguous; indices are the
// flat position h*W + w of the winner in its (n,c) plane, as in PyTorch.

// The window of (p,q) starts at (h0, w0) = (p*sh - ph, q*sw - pw); its cells
// are (h0 + r*dh, w0 + s*dw), r < R, s < S. Those outside the input are skipped
// (they are -inf padding). A cell wins when it is larger than the best so far
// or is NaN: the first maximum in row-major order wins, and a NaN beats every
// number (PyTorch's rule, the last NaN among several). A window of -inf keeps
// its first cell inside the input (the geometry check guarantees one).
template <typename T> __device__ T negative_infinity();
template <> __device__ float negative_infinity<float>() { return __int_as_float((int)0xff800000u); }
template <> __device__ double negative_infinity<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

// The taps [lo, hi) of a window starting at start (step d, taps k) that fall in [0, size).
__device__ inline void taps_inside(int start, int size, int d, int k, int& lo, int& hi) {
    lo = start < 0 ? (-start + d - 1) / d : 0;
    const int last = (size - 1 - start) / d + 1;  // start < size for a window with a cell inside
    hi = last < k ? last : k;
}

template <typename T>
__global__ void max_pool2d_forward(const T* __restrict__ x, T* __restrict__ y,
                                   long long* __restrict__ indices, int N, int C, int H, int W,
                                   int R, int S, int P, int Q, int sh, int sw, int ph, int pw,
                                   int dh, int dw) {
    const long long total = (long long)N * C * P * Q;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int q = (int)(i % Q);
        const int p = (int)((i / Q) % P);
        const long long plane = i / ((long long)P * Q);
        const T* xp = x + plane * H * W;
        const int h0 = p * sh - ph, w0 = q * sw - pw;
        int r0, r1, s0, s1;
        taps_inside(h0, H, dh, R, r0, r1);
        taps_inside(w0, W, dw, S, s0, s1);
        T best = negative_infinity<T>();
        long long best_at = (long long)(h0 + r0 * dh) * W + (w0 + s0 * dw);
        for (int r = r0; r < r1; ++r) {
            const int h = h0 + r * dh;
            for (int s = s0; s < s1; ++s) {
                const int w = w0 + s * dw;
                const T v = xp[(long long)h * W + w];
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
// whose recorded winner is (h,w). A winner lies in its window, and window p
// spans rows p*sh - ph .. p*sh - ph + dh*(R-1), so p runs from
// ceil((h + ph - dh*(R-1)) / sh) to floor((h + ph) / sh). One thread per input
// pixel, p-then-q order.
template <typename T>
__global__ void max_pool2d_backward(const T* __restrict__ dy, const long long* __restrict__ indices,
                                    T* __restrict__ dx, int N, int C, int H, int W, int R, int S,
                                    int P, int Q, int sh, int sw, int ph, int pw, int dh, int dw) {
    const long long total = (long long)N * C * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const long long plane = i / ((long long)H * W);
        const long long here = (long long)h * W + w;
        const int hp = h + ph, wp = w + pw;
        const int hr = hp - dh * (R - 1), wr = wp - dw * (S - 1);
        const int p_lo = hr > 0 ? (hr + sh - 1) / sh : 0;
        const int q_lo = wr > 0 ? (wr + sw - 1) / sw : 0;
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
