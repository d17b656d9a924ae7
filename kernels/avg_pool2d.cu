// Average pooling as gathers: the forward sums each window in one thread, the
// backward gathers for every input pixel the shares of the windows covering it.
// Fixed summation orders, no atomics: bitwise repeatable.
// Layouts: x, dx (N,C,H,W); y, dy (N,C,P,Q) contiguous.
//
// The window of (p,q) covers rows p*sh - ph .. p*sh - ph + R - 1 of the
// zero-padded input, clipped at H + ph (a ceil_mode window may overhang it);
// columns likewise. Its divisor D (PyTorch's):
//   divisor_override                                  when it is not 0,
//   the clipped window's cells (padding included)     when count_include_pad,
//   the window's cells inside the input               otherwise.
// The geometry check guarantees every window a cell inside the input.

// One axis of a window starting at start (k cells, input size, padding pad):
// the cells inside the input, [lo, hi), and the count inside the padded input.
struct Span {
    int lo, hi, padded;
};

__device__ inline Span span(int start, int k, int size, int pad) {
    const int end = start + k < size + pad ? start + k : size + pad;
    Span a;
    a.lo = start > 0 ? start : 0;
    a.hi = end < size ? end : size;
    a.padded = end - start;
    return a;
}

__device__ inline int divisor(const Span& a, const Span& b, int count_include_pad,
                              int divisor_override) {
    return divisor_override != 0 ? divisor_override
         : count_include_pad     ? a.padded * b.padded
                                 : (a.hi - a.lo) * (b.hi - b.lo);
}

// y[n,c,p,q] = (sum of the window's cells inside x, row-major) / D.
template <typename T>
__global__ void avg_pool2d_forward(const T* __restrict__ x, T* __restrict__ y, int N, int C,
                                   int H, int W, int R, int S, int P, int Q, int sh, int sw,
                                   int ph, int pw, int count_include_pad, int divisor_override) {
    const long long total = (long long)N * C * P * Q;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int q = (int)(i % Q);
        const int p = (int)((i / Q) % P);
        const long long plane = i / ((long long)P * Q);
        const T* xp = x + plane * H * W;
        const Span a = span(p * sh - ph, R, H, ph), b = span(q * sw - pw, S, W, pw);
        T sum = 0;
        for (int h = a.lo; h < a.hi; ++h) {
            for (int w = b.lo; w < b.hi; ++w) sum += xp[(long long)h * W + w];
        }
        y[i] = sum / (T)divisor(a, b, count_include_pad, divisor_override);
    }
}

// dx[n,c,h,w] = sum over the windows (p,q) covering (h,w) of dy[n,c,p,q] / D(p,q).
// Window p covers h when p*sh - ph <= h < p*sh - ph + R, so p runs from
// ceil((h + ph - R + 1) / sh) to floor((h + ph) / sh); (h,w) is inside x, so a
// window that covers it covers it with a counted cell. One thread per input
// pixel, p-then-q order.
template <typename T>
__global__ void avg_pool2d_backward(const T* __restrict__ dy, T* __restrict__ dx, int N, int C,
                                    int H, int W, int R, int S, int P, int Q, int sh, int sw,
                                    int ph, int pw, int count_include_pad, int divisor_override) {
    const long long total = (long long)N * C * H * W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int w = (int)(i % W);
        const int h = (int)((i / W) % H);
        const long long plane = i / ((long long)H * W);
        const int hp = h + ph, wp = w + pw;
        const int p_lo = hp - R + 1 > 0 ? (hp - R + 1 + sh - 1) / sh : 0;
        const int q_lo = wp - S + 1 > 0 ? (wp - S + 1 + sw - 1) / sw : 0;
        const int p_hi = hp / sh < P - 1 ? hp / sh : P - 1;
        const int q_hi = wp / sw < Q - 1 ? wp / sw : Q - 1;
        T acc = 0;
        const T* dyp = dy + plane * P * Q;
        for (int p = p_lo; p <= p_hi; ++p) {
            const Span a = span(p * sh - ph, R, H, ph);
            for (int q = q_lo; q <= q_hi; ++q) {
                const Span b = span(q * sw - pw, S, W, pw);
                acc += dyp[(long long)p * Q + q] / (T)divisor(a, b, count_include_pad,
                                                              divisor_override);
            }
        }
        dx[i] = acc;
    }
}
