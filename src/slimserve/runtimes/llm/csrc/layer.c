/* One decoder layer of a decode step (one new token a row), in one call.
 *
 * A one-row SmolLM2-135M step spends ~8 ms in its matmuls and attention and ~3 ms more in the
 * ~20 small torch operations around them in each of its 30 layers (norms, casts, rotary,
 * residual adds, silu, the kernel's Python wrappers): microseconds each of dispatch. This file
 * does the same arithmetic as decode.py's torch path between the matmuls, in C:
 *
 *   h = rms_norm(x) * attn_norm            (rounded to bf16 where the torch path casts)
 *   q, k, v = h @ Wqkv (+ bias); q, k rotated at each row's position
 *   attention over each row's block table (qgemv.c), the new K/V written first
 *   x += attention @ Wo
 *   h = rms_norm(x) * mlp_norm             (rounded likewise)
 *   x += (silu(h @ Wgate) * (h @ Wup)) @ Wdown
 *
 * the matmuls and the attention shared over the cores by qgemv.c's pool, the rest on the
 * caller's thread (a few thousand values a row). One translation unit with qgemv.c, which it
 * includes: the pool, the kernel and the attention are static there.
 */
#include <math.h>

#include "qgemv.c"

typedef struct {
    const Weight *qkv, *o, *gate_up, *down;
    const float *qkv_bias; /* ((H + 2 Hkv) hd) or NULL */
    const float *attn_norm, *mlp_norm; /* (D,) */
} DecodeLayer;

typedef struct {
    int rows, hidden, inter, heads, kv_heads, hd;
    float eps, scale;
    int round_bf16;           /* the norms' outputs rounded to bf16 before the matmuls */
    int cache_bf16;           /* the pool's dtype: fp32 (0) or bf16 (1) */
    const float *cos, *sin;   /* (positions, hd) rotary tables */
    const int64_t *positions; /* (rows,) the new token's position in each row */
    const int64_t *slots;     /* (rows,) where its K/V go, flat within a head */
    const int64_t *tables;    /* (rows, width) block tables */
    int width, bs;
    long blocks;
    void *scratch; /* qgemv_decode_scratch_bytes(...) bytes */
    int threads;
} DecodeStep;

/* fp32 -> the nearest bf16 (ties to even), as its 16 high bits. */
static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float round_bf16(float f) { return bf16_to_float(to_bf16(f)); }

/* out = x * rsqrt(mean(x^2) + eps) * w for each of `rows` rows of n. */
static void rms_norm(const float *x, const float *w, int rows, int n, float eps, int round,
                     float *out) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *o = out + (size_t)r * n;
        __m512 acc = _mm512_setzero_ps();
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 v = _mm512_loadu_ps(xr + i);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float total = _mm512_reduce_add_ps(acc);
        for (; i < n; i++) total += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(total / (float)n + eps);
        for (i = 0; i < n; i++) {
            float v = xr[i] * inv * w[i];
            o[i] = round ? round_bf16(v) : v;
        }
    }
}

/* act (rows, I) = silu(gate) * up, from gate_up (rows, 2 I) = [gate | up]. */
static void silu_mul(const float *gate_up, int rows, int inter, float *act) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int r = 0; r < rows; r++) {
        const float *g = gate_up + (size_t)r * 2 * inter, *u = g + inter;
        float *a = act + (size_t)r * inter;
        for (int i = 0; i < inter; i += 16) {
            const __mmask16 m = inter - i >= 16 ? (__mmask16)0xFFFF
                                                : (__mmask16)((1u << (inter - i)) - 1);
            __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
            __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            _mm512_mask_storeu_ps(a + i, m, _mm512_mul_ps(s, uv));
        }
    }
}

/* Head vectors rotated at `pos` (rotate_half convention: the first half pairs with the
 * second), into `out`; `count` heads of hd. */
static void rotate(const float *in, int count, int hd, const float *cos, const float *sin,
                   float *out) {
    const int half = hd / 2;
    for (int h = 0; h < count; h++) {
        const float *x = in + (size_t)h * hd;
        float *o = out + (size_t)h * hd;
        for (int j = 0; j < half; j++) o[j] = x[j] * cos[j] - x[j + half] * sin[j];
        for (int j = half; j < hd; j++) o[j] = x[j] * cos[j] + x[j - half] * sin[j];
    }
}

/* n values into the pool's dtype. */
static void store_kv(const float *in, size_t n, int bf16, void *out) {
    if (!bf16) {
        memcpy(out, in, n * sizeof(float));
        return;
    }
    for (size_t i = 0; i < n; i++) ((uint16_t *)out)[i] = to_bf16(in[i]);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

typedef struct {
    float *h, *qkv, *q, *k, *v, *attn, *gate_up, *act, *y;
    void *quant;
} Scratch;

/* Carve the caller's buffer (bytes from qgemv_decode_scratch_bytes). */
static size_t carve(const DecodeStep *s, Scratch *out) {
    const size_t R = (size_t)s->rows, hd = (size_t)s->hd;
    const size_t wide = (size_t)(s->heads + 2 * s->kv_heads) * hd, attn = (size_t)s->heads * hd;
    const size_t kmax = (size_t)(s->inter > s->hidden ? s->inter : s->hidden);
    const size_t kmax2 = attn > kmax ? attn : kmax;
    const size_t sizes[10] = {
        R * s->hidden * 4,                 R * wide * 4,          R * attn * 4,
        R * s->kv_heads * hd * 4,          R * s->kv_heads * hd * 4, R * attn * 4,
        R * 2 * s->inter * 4,              R * s->inter * 4,      R * kmax2 * 4,
        R * kmax2 + 8 * R * (kmax2 / GROUP),
    };
    char *base = (char *)s->scratch;
    size_t at = 0;
    void *parts[10];
    for (int i = 0; i < 10; i++) {
        parts[i] = base ? base + at : NULL;
        at += align64(sizes[i]);
    }
    if (out) {
        out->h = parts[0], out->qkv = parts[1], out->q = parts[2], out->k = parts[3];
        out->v = parts[4], out->attn = parts[5], out->gate_up = parts[6], out->act = parts[7];
        out->y = parts[8], out->quant = parts[9];
    }
    return at;
}

long qgemv_decode_scratch_bytes(const DecodeStep *s) { return (long)carve(s, NULL); }

/* x (rows, hidden) fp32, updated in place: one layer of a decode step over `cache`, the
 * layer's pool (2, Hkv, blocks, bs, hd). */
void qgemv_decode_layer(const DecodeLayer *L, const DecodeStep *s, void *cache, float *x) {
    Scratch t;
    carve(s, &t);
    const int R = s->rows, D = s->hidden, hd = s->hd, H = s->heads, Hkv = s->kv_heads;
    const int wide = (H + 2 * Hkv) * hd;

    rms_norm(x, L->attn_norm, R, D, s->eps, s->round_bf16, t.h);
    qgemv_linear(L->qkv, t.h, 0, R, t.qkv, t.quant, s->threads);
    for (int r = 0; r < R; r++) {
        float *row = t.qkv + (size_t)r * wide;
        if (L->qkv_bias)
            for (int i = 0; i < wide; i++) row[i] += L->qkv_bias[i];
        const float *cos = s->cos + (size_t)s->positions[r] * hd;
        const float *sin = s->sin + (size_t)s->positions[r] * hd;
        rotate(row, H, hd, cos, sin, t.q + (size_t)r * H * hd);
        rotate(row + (size_t)H * hd, Hkv, hd, cos, sin, t.k + (size_t)r * Hkv * hd);
        memcpy(t.v + (size_t)r * Hkv * hd, row + (size_t)(H + Hkv) * hd,
               (size_t)Hkv * hd * sizeof(float));
    }
    const void *k = t.k, *v = t.v;
    if (s->cache_bf16) { /* in place: a bf16 copy takes half the room */
        store_kv(t.k, (size_t)R * Hkv * hd, 1, t.k);
        store_kv(t.v, (size_t)R * Hkv * hd, 1, t.v);
    }
    qgemv_attend_rows(t.q, k, v, cache, s->cache_bf16, R, H, Hkv, hd, s->blocks, s->bs,
                      s->slots, s->tables, s->width, s->positions, s->scale, t.attn, s->threads);
    qgemv_linear(L->o, t.attn, 0, R, t.y, t.quant, s->threads);
    for (size_t i = 0; i < (size_t)R * D; i++) x[i] += t.y[i];

    rms_norm(x, L->mlp_norm, R, D, s->eps, s->round_bf16, t.h);
    qgemv_linear(L->gate_up, t.h, 0, R, t.gate_up, t.quant, s->threads);
    silu_mul(t.gate_up, R, s->inter, t.act);
    qgemv_linear(L->down, t.act, 0, R, t.y, t.quant, s->threads);
    for (size_t i = 0; i < (size_t)R * D; i++) x[i] += t.y[i];
}
