// Causal self-attention on CPU for heads of 16, 32 or 64 dims, forward and backward (float32).
//
// qkv is the (B, T, 3C) output of the fused q/k/v projection; y the (B, TQ, C) attention output before c_proj.
// Query i sits at position i * qs (qs = 1: every position; qs = 2: the even ones) and sees keys 0 .. i * qs.
// One batch item at a time is staged head by head into contiguous buffers that stay in L2; each query row is
// then a few FMA loops one vector register wide. The softmax uses a vectorised exp; the backward recomputes P
// from the saved log-sum-exp, as flash attention does.
//
// Also GPT-2's tanh-GELU, x sigmoid(2u) with u = sqrt(2/pi) (x + 0.044715 x^3), forward and backward in one pass
// each (the forward also writes sigmoid(2u) for the backward), where ATen needs 4 and 7 (icl_core.model.SigmoidGELU).
#include <math.h>
#include <stdlib.h>
#include <string.h>

namespace {

// One vector register: 16 floats with AVX-512, 8 with AVX2 (GCC splits 64-byte vectors badly there: 3-6x slower).
#ifdef __AVX512F__
constexpr int W = 16;
#else
constexpr int W = 8;
#endif
// Keys per block in the backward's column loop: its 2 KB D / W accumulators fill about half the vector registers
// (32 with AVX-512, 16 with AVX2).
template <int D>
constexpr int KEY_BLOCK = 8 * W / D;
typedef float vf __attribute__((vector_size(4 * W)));
typedef int vi __attribute__((vector_size(4 * W)));

inline vf load(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline float hsum(vf v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }
inline float hmax(vf v) { float s = v[0]; for (int i = 1; i < W; ++i) s = v[i] > s ? v[i] : s; return s; }

// e^x for x <= 0 (Cody-Waite reduction and a degree-6 polynomial, about 1 ulp); 0 below -87 and for -inf.
inline vf exp_neg(vf x) {
    const vf lo = splat(-87.0f);
    vi under = x < lo;
    x = x < lo ? lo : x;
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf scale;
    memcpy(&scale, &e, sizeof scale);
    return under ? vf{} : p * scale;
}

struct Dims {
    long B, T, TQ, qs, C, H, Tp;
    float scale;
};

// s[j] = sum_d a[d] XT[d][j] over the blocks of W keys j < W nb; four blocks at a time hide the FMA latency.
template <int D>
inline void row_times(const float* a, const float* XT, long Tp, long nb, float* s) {
    long jb = 0;
    for (; jb + 4 <= nb; jb += 4) {
        vf acc[4] = {};
        for (int d = 0; d < D; ++d)
            for (int u = 0; u < 4; ++u) acc[u] += a[d] * load(XT + d * Tp + (jb + u) * W);
        for (int u = 0; u < 4; ++u) store(s + (jb + u) * W, acc[u]);
    }
    for (; jb < nb; ++jb) {
        vf acc0{}, acc1{};
        for (int d = 0; d < D; d += 2) {
            acc0 += a[d] * load(XT + d * Tp + jb * W);
            acc1 += a[d + 1] * load(XT + (d + 1) * Tp + jb * W);
        }
        store(s + jb * W, acc0 + acc1);
    }
}

// out[:] = sum_{j < n} w[j] X[j][:] (X rows of D floats), four partial sums.
template <int D>
inline void weighted_rows(const float* w, const float* X, long n, vf out[D / W]) {
    vf acc[4][D / W] = {};
    long j = 0;
    for (; j + 4 <= n; j += 4)
        for (int u = 0; u < 4; ++u)
            for (int c = 0; c < D / W; ++c) acc[u][c] += w[j + u] * load(X + (j + u) * D + c * W);
    for (; j < n; ++j)
        for (int c = 0; c < D / W; ++c) acc[0][c] += w[j] * load(X + j * D + c * W);
    for (int c = 0; c < D / W; ++c) out[c] = (acc[0][c] + acc[1][c]) + (acc[2][c] + acc[3][c]);
}

// Stage one batch item's rows head by head: part 0 (q), 1 (k) or 2 (v) of every row, as rows (T x D) and/or
// transposed (D x Tp).
template <int D>
void stage(const Dims& m, const float* rows, long stride, int part, float* R, float* RT) {
    const long size = (long)D * m.Tp;
    for (long j = 0; j < m.T; ++j) {
        const float* src = rows + j * stride + part * m.C;
        for (long h = 0; h < m.H; ++h)
            for (int d = 0; d < D; ++d) {
                const float x = src[h * D + d];
                if (R) R[h * size + j * D + d] = x;
                if (RT) RT[h * size + d * m.Tp + j] = x;
            }
    }
}

template <int D>
void forward_item(const Dims& m, const float* qkv, float* y, float* lse, float* Q, float* KT, float* V, float* s) {
    const long size = (long)D * m.Tp;
    stage<D>(m, qkv, 3 * m.C, 0, Q, nullptr);
    stage<D>(m, qkv, 3 * m.C, 1, nullptr, KT);
    stage<D>(m, qkv, 3 * m.C, 2, V, nullptr);
    for (long h = 0; h < m.H; ++h)
        for (long i = 0; i < m.TQ; ++i) {
            const long n = i * m.qs + 1, nb = (n + W - 1) / W;
            float qs[D];
            for (int d = 0; d < D; ++d) qs[d] = Q[h * size + (n - 1) * D + d] * m.scale;
            row_times<D>(qs, KT + h * size, m.Tp, nb, s);
            for (long j = n; j < nb * W; ++j) s[j] = -INFINITY;
            vf mv = load(s);
            for (long jb = 1; jb < nb; ++jb) {
                vf x = load(s + jb * W);
                mv = x > mv ? x : mv;
            }
            const float mx = hmax(mv);
            vf lv{};
            for (long jb = 0; jb < nb; ++jb) {
                vf p = exp_neg(load(s + jb * W) - mx);
                store(s + jb * W, p);
                lv += p;
            }
            const float l = hsum(lv);
            vf o[D / W];
            weighted_rows<D>(s, V + h * size, n, o);
            float* out = y + i * m.C + h * D;
            for (int c = 0; c < D / W; ++c) store(out + c * W, o[c] * (1.0f / l));
            lse[h * m.TQ + i] = mx + logf(l);
        }
}

template <int D>
void backward_item(const Dims& m, const float* qkv, const float* y, const float* lse, const float* gy, float* gqkv,
                   float* Q, float* K, float* KT, float* VT, float* P, float* dS) {
    const long size = (long)D * m.Tp, C3 = 3 * m.C;
    stage<D>(m, qkv, C3, 0, Q, nullptr);
    stage<D>(m, qkv, C3, 1, K, KT);
    stage<D>(m, qkv, C3, 2, nullptr, VT);
    if (m.qs > 1)  // rows that ask no query get no gradient through q
        for (long j = 0; j < m.T; ++j)
            if (j % m.qs) memset(gqkv + j * C3, 0, sizeof(float) * m.C);
    for (long h = 0; h < m.H; ++h) {
        const float *Qh = Q + h * size, *Kh = K + h * size;
        // Rows: P and dS (softmax scale folded in), then dQ = dS K.
        for (long i = 0; i < m.TQ; ++i) {
            const long n = i * m.qs + 1, nb = (n + W - 1) / W;
            const float* o = y + i * m.C + h * D;
            const float* g = gy + i * m.C + h * D;
            float qs[D];
            float Di = 0.0f;
            for (int d = 0; d < D; ++d) {
                Di += g[d] * o[d];
                qs[d] = Qh[(n - 1) * D + d] * m.scale;
            }
            float* p = P + i * m.Tp;
            float* ds = dS + i * m.Tp;
            row_times<D>(qs, KT + h * size, m.Tp, nb, p);
            row_times<D>(g, VT + h * size, m.Tp, nb, ds);
            const float li = lse[h * m.TQ + i];
            for (long jb = 0; jb < nb; ++jb) {
                vf pv = exp_neg(load(p + jb * W) - li);
                store(p + jb * W, pv);
                store(ds + jb * W, pv * (load(ds + jb * W) - Di) * m.scale);
            }
            for (long j = n; j < nb * W; ++j) p[j] = 0.0f, ds[j] = 0.0f;
            vf dq[D / W];
            weighted_rows<D>(ds, Kh, n, dq);
            float* gq = gqkv + (n - 1) * C3 + h * D;
            for (int c = 0; c < D / W; ++c) store(gq + c * W, dq[c]);
        }
        // Columns, KB keys at a time: dK_j = sum_i dS_ij q_i, dV_j = sum_i P_ij dO_i over the queries that see j.
        constexpr int KB = KEY_BLOCK<D>;
        for (long j0 = 0; j0 < m.T; j0 += KB) {
            vf dk[KB][D / W] = {}, dv[KB][D / W] = {};
            for (long i = (j0 + m.qs - 1) / m.qs; i < m.TQ; ++i) {
                const float* q = Qh + i * m.qs * D;
                const float* g = gy + i * m.C + h * D;
                const float* ds = dS + i * m.Tp + j0;
                const float* p = P + i * m.Tp + j0;
                vf qr[D / W], gr[D / W];
                for (int c = 0; c < D / W; ++c) qr[c] = load(q + c * W), gr[c] = load(g + c * W);
                for (int u = 0; u < KB; ++u)
                    for (int c = 0; c < D / W; ++c) {
                        dk[u][c] += ds[u] * qr[c];
                        dv[u][c] += p[u] * gr[c];
                    }
            }
            for (int u = 0; u < KB && j0 + u < m.T; ++u)
                for (int c = 0; c < D / W; ++c) {
                    store(gqkv + (j0 + u) * C3 + m.C + h * D + c * W, dk[u][c]);
                    store(gqkv + (j0 + u) * C3 + 2 * m.C + h * D + c * W, dv[u][c]);
                }
        }
    }
}

Dims dims(long B, long T, long TQ, long qs, long C, long H) {
    Dims m{B, T, TQ, qs, C, H, (T + W - 1) / W * W, 0.0f};
    m.scale = 1.0f / sqrtf((float)(C / H));
    return m;
}

float* zeroed(long n) {
    float* p = (float*)aligned_alloc(64, sizeof(float) * ((n + W - 1) / W * W));
    if (p) memset(p, 0, sizeof(float) * n);
    return p;
}

template <int D>
int forward_all(const Dims& m, const float* qkv, float* y, float* lse) {
    const long size = m.H * D * m.Tp;
    float* buf = zeroed(3 * size + m.Tp);
    if (!buf) return 2;
    for (long b = 0; b < m.B; ++b)
        forward_item<D>(m, qkv + b * m.T * 3 * m.C, y + b * m.TQ * m.C, lse + b * m.H * m.TQ, buf, buf + size,
                        buf + 2 * size, buf + 3 * size);
    free(buf);
    return 0;
}

template <int D>
int backward_all(const Dims& m, const float* qkv, const float* y, const float* lse, const float* gy, float* gqkv) {
    const long size = m.H * D * m.Tp;
    float* buf = zeroed(4 * size + 2 * m.TQ * m.Tp + 8);  // + 8: a key block may read past the last row
    if (!buf) return 2;
    for (long b = 0; b < m.B; ++b) {
        const long yoff = b * m.TQ * m.C;
        backward_item<D>(m, qkv + b * m.T * 3 * m.C, y + yoff, lse + b * m.H * m.TQ, gy + yoff,
                         gqkv + b * m.T * 3 * m.C, buf, buf + size, buf + 2 * size, buf + 3 * size, buf + 4 * size,
                         buf + 4 * size + m.TQ * m.Tp);
    }
    free(buf);
    return 0;
}


// sigmoid(z) from exp of -|z|, so exp never overflows.
inline vf sigmoid(vf z) {
    vi neg = z < 0.0f;
    vf e = exp_neg(neg ? z : -z);
    vf s = 1.0f / (1.0f + e);
    return neg ? e * s : s;
}

constexpr float GELU_K2 = 2.0f * 0.7978845608028654f;  // 2 sqrt(2/pi)
constexpr float GELU_C = 0.044715f;

inline vf gelu_s(vf x) { return sigmoid(GELU_K2 * x * (1.0f + GELU_C * x * x)); }
// g gelu'(x) from s = sigmoid(2u); x clamped at |x| = 20 in x (2u)', where s is exactly 0 or 1 in float32, so x^3
// stays finite (as in SigmoidGELU.backward).
inline vf gelu_grad_v(vf x, vf s, vf g) {
    vf xc = x > 20.0f ? splat(20.0f) : (x < -20.0f ? splat(-20.0f) : x);
    vf d = GELU_K2 * xc * (1.0f + 3.0f * GELU_C * xc * xc);  // x (2u)'
    return g * (s + s * (1.0f - s) * d);
}

}  // namespace

extern "C" {

// Returns 0, 1 for an unsupported head size, 2 when out of memory.
int attn_forward(const float* qkv, float* y, float* lse, long B, long T, long TQ, long qs, long C, long H) {
    const Dims m = dims(B, T, TQ, qs, C, H);
    if (C % H) return 1;
    switch (C / H) {
        case 16: return forward_all<16>(m, qkv, y, lse);
        case 32: return forward_all<32>(m, qkv, y, lse);
        case 64: return forward_all<64>(m, qkv, y, lse);
        default: return 1;
    }
}

int attn_backward(const float* qkv, const float* y, const float* lse, const float* gy, float* gqkv, long B, long T,
                  long TQ, long qs, long C, long H) {
    const Dims m = dims(B, T, TQ, qs, C, H);
    if (C % H) return 1;
    switch (C / H) {
        case 16: return backward_all<16>(m, qkv, y, lse, gy, gqkv);
        case 32: return backward_all<32>(m, qkv, y, lse, gy, gqkv);
        case 64: return backward_all<64>(m, qkv, y, lse, gy, gqkv);
        default: return 1;
    }
}

void gelu_forward(const float* x, float* y, float* sig, long n) {
    long i = 0;
    for (; i + W <= n; i += W) {
        vf v = load(x + i), sv = gelu_s(v);
        store(y + i, v * sv);
        store(sig + i, sv);
    }
    if (i < n) {  // the tail through full vectors
        float a[W] = {}, b[W], c[W];
        memcpy(a, x + i, (n - i) * sizeof(float));
        vf v = load(a), sv = gelu_s(v);
        store(b, v * sv);
        store(c, sv);
        memcpy(y + i, b, (n - i) * sizeof(float));
        memcpy(sig + i, c, (n - i) * sizeof(float));
    }
}

void gelu_backward(const float* x, const float* sig, const float* gy, float* gx, long n) {
    long i = 0;
    for (; i + W <= n; i += W) store(gx + i, gelu_grad_v(load(x + i), load(sig + i), load(gy + i)));
    if (i < n) {
        float a[W] = {}, c[W] = {}, g[W] = {}, b[W];
        memcpy(a, x + i, (n - i) * sizeof(float));
        memcpy(c, sig + i, (n - i) * sizeof(float));
        memcpy(g, gy + i, (n - i) * sizeof(float));
        store(b, gelu_grad_v(load(a), load(c), load(g)));
        memcpy(gx + i, b, (n - i) * sizeof(float));
    }
}
}
