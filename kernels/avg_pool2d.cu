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

struct AvgWindow {
    int h0, h1, w0, w1;  // the window's cells inside the input: [h0, h1) x [w0, w1)
    int divisor;
};

__device__ inline AvgWindow avg_window(int p, int q, int H, int W, int R, int S, int sh, int sw,
                                       int ph, int pw, int count_include_pad,
                                       int divisor_override) {
    AvgWindow a;
    const int hs = p * sh - ph, ws = q * sw - pw;
    const int he = hs + R < H + ph ? hs + R : H + ph;
    const int we = ws + S < W + pw ? ws + S : W + pw;
    a.h0 = hs > 0 ? hs : 0;
    a.w0 = ws > 0 ? ws : 0;
    a.h1 = he < H ? he : H;
    a.w1 = we < W ? we : W;
    a.divisor = divisor_override != 0 ? divisor_override
              : count_include_pad     ? (he - hs) * (we - ws)
                                      : (a.h1 - a.h0) * (a.w1 - a.w0);
    return a;
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
        const AvgWindow a = avg_window(p, q, H, W, R, S, sh, sw, ph, pw, count_include_pad,
                                       divisor_override);
        T sum = 0;
        for (int h = a.h0; h < a.h1; ++h) {
            for (int w = a.w0; w < a.w1; ++w) sum += xp[(long long)h * W + w];
        }
        y[i] = sum / (T)a.divisor;
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
        for (int p = p_lo; p <= p_hi; ++p) {
            for (int q = q_lo; q <= q_hi; ++q) {
                const AvgWindow a = avg_window(p, q, H, W, R, S, sh, sw, ph, pw,
                                               count_include_pad, divisor_override);
                acc += dy[plane * P * Q + (long long)p * Q + q] / (T)a.divisor;
            }
        }
        dx[i] = acc;
    }
}
