/* Few-row matmuls from 4- and 8-bit weights with int8 activations (AVX-512 VNNI), split over
 * the cores by a small spinning thread pool (no OpenMP barrier per call).
 *
 * Built and loaded by slimserve/runtimes/llm/qgemv.py (compiled on first use, ctypes), which
 * also packs the weights. The approach is llama.cpp's Q4_1 x Q8_0 / Q8_0 x Q8_0 dot product:
 *
 * - weights: unsigned levels per group of 32 input channels, w = level * scale + offset, scale
 *   and offset fp16 per group; 4-bit levels (two a byte) or 8-bit levels (a Q8_0 weight q in
 *   -127..127 is level q + 128 with offset -128 * scale);
 * - activations: each row quantized per group of 32 to int8, x = q * d (d = max|x| / 127);
 * - y[m, n] = sum over groups g of scale[n, g] * d[m, g] * dot(level, q) + offset[n, g] * d[m, g]
 *   * sum(q): `vpdpbusd` multiplies 64 unsigned levels by 64 signed activations a cycle.
 *
 * Inside each chunk of 64 channels (two groups) the values are stored permuted so that the
 * 16 int32 lanes of one `vpdpbusd` alternate between the two groups (lane l sums channels of
 * group l % 2): the two groups' scales then broadcast as a pair (`vbroadcastf32x2`) and no
 * horizontal sum is needed until the end of the row. The 4-bit chunk is 32 bytes: low
 * nibbles are permuted positions 0..31, high nibbles 32..63.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 64
#define GROUP 32
#define MAX_THREADS 64
#define SPIN_NS 200000 /* a worker spins this long for the next job before it sleeps */

/* Position p of a permuted chunk holds channel perm(p) of the chunk. */
static inline int perm(int p) {
    int lane = p >> 2;
    return (lane & 1) * GROUP + (lane >> 1) * 4 + (p & 3);
}

int qgemv_perm(int p) { return perm(p); }

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rows of x (M, K) fp32 or bf16 -> qx (M, K) int8 permuted per chunk, d (M, K/32) fp32 the
 * groups' steps, dsum (M, K/32) fp32 = d * sum(q) of each group. */
void qgemv_quantize(const void *x, int is_bf16, int M, int K, int8_t *qx, float *d, float *dsum) {
    int groups = K / GROUP;
    for (int m = 0; m < M; m++) {
        for (int c = 0; c < K / CHUNK; c++) {
            float v[CHUNK];
            int8_t q[CHUNK];
            size_t base = (size_t)m * K + (size_t)c * CHUNK;
            for (int i = 0; i < CHUNK; i++)
                v[i] = is_bf16 ? bf16_to_float(((const uint16_t *)x)[base + i])
                               : ((const float *)x)[base + i];
            for (int g = 0; g < 2; g++) {
                float amax = 0.0f;
                for (int i = 0; i < GROUP; i++) {
                    float a = v[g * GROUP + i] < 0 ? -v[g * GROUP + i] : v[g * GROUP + i];
                    amax = a > amax ? a : amax;
                }
                float step = amax / 127.0f;
                float inv = step > 0 ? 1.0f / step : 0.0f;
                int sum = 0;
                for (int i = 0; i < GROUP; i++) {
                    int r = (int)__builtin_roundf(v[g * GROUP + i] * inv);
                    q[g * GROUP + i] = (int8_t)r;
                    sum += r;
                }
                d[(size_t)m * groups + 2 * c + g] = step;
                dsum[(size_t)m * groups + 2 * c + g] = step * (float)sum;
            }
            for (int p = 0; p < CHUNK; p++) qx[base + p] = q[perm(p)];
        }
    }
}

typedef struct {
    const uint8_t *levels;   /* (N, K / 2) 4-bit or (N, K) 8-bit, permuted chunks */
    const float *scales;     /* (N, K / 32) fp32 (read every chunk: no conversion) */
    const uint16_t *offsets; /* (N, K / 32) fp16 */
    const int8_t *qx;        /* (M, K) */
    const float *d;          /* (M, K / 32) */
    const float *dsum;       /* (M, K / 32) */
    float *y;                /* (M, N) */
    int M, N, K, bits;
} Job;

static inline float offset_dot(const uint16_t *off, const float *dsum, int groups) {
    __m512 acc = _mm512_setzero_ps();
    int g = 0;
    for (; g + 16 <= groups; g += 16) {
        __m512 o = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(off + g)));
        acc = _mm512_fmadd_ps(o, _mm512_loadu_ps(dsum + g), acc);
    }
    if (g < groups) {
        __mmask16 mask = (__mmask16)((1u << (groups - g)) - 1);
        __m512 o = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, off + g));
        acc = _mm512_fmadd_ps(o, _mm512_maskz_loadu_ps(mask, dsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static inline __m512 pair(const void *two_floats) {
    return _mm512_broadcast_f32x2(_mm_castpd_ps(_mm_load_sd((const double *)two_floats)));
}

static inline __m512i load_levels(const uint8_t *row, int c, int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)(row + (size_t)c * CHUNK));
    /* 32 bytes in both halves; the upper half shifted by 4: low nibbles, then high ones. */
    __m512i both = _mm512_broadcast_i64x4(
        _mm256_loadu_si256((const __m256i *)(row + (size_t)c * (CHUNK / 2))));
    __m512i shifted = _mm512_srlv_epi64(both, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0));
    return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
}

/* Output n for R (1..4) activation rows starting at m0: the weight row is unpacked once. */
static inline __attribute__((always_inline)) void rows_dot(const Job *j, int n, int m0, int R) {
    const int K = j->K, groups = K / GROUP, chunks = K / CHUNK;
    const size_t row_bytes = (size_t)(j->bits == 4 ? K / 2 : K);
    const uint8_t *row = j->levels + (size_t)n * row_bytes;
    const float *scale = j->scales + (size_t)n * groups;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    const __m512i zero = _mm512_setzero_si512();
    for (int c = 0; c < chunks; c++) {
        __m512i w = load_levels(row, c, j->bits);
        __m512 s = pair(scale + 2 * c);
        for (int r = 0; r < R; r++) {
            int m = m0 + r;
            const int8_t *q = j->qx + (size_t)m * K + (size_t)c * CHUNK;
            __m512i dot = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512((const void *)q));
            __m512 step = _mm512_mul_ps(s, pair(j->d + (size_t)m * groups + 2 * c));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), step, acc[r]);
        }
    }
    const uint16_t *off = j->offsets + (size_t)n * groups;
    for (int r = 0; r < R; r++) {
        int m = m0 + r;
        float tail = offset_dot(off, j->dsum + (size_t)m * groups, groups);
        j->y[(size_t)m * j->N + n] = _mm512_reduce_add_ps(acc[r]) + tail;
    }
}

/* Outputs n0..n1-1 for every activation row. One weight row at a time, all activation rows
 * against it: interleaving four weight rows (activations loaded once for four) was slower
 * when the weights stream from DRAM (SmolLM2's head: 4.9 against 2.0 ms); the hardware
 * prefetcher prefers one stream. */
static void run_rows(const Job *j, int n0, int n1) {
    for (int n = n0; n < n1; n++) {
        int m0 = 0;
        for (; m0 + 4 <= j->M; m0 += 4) rows_dot(j, n, m0, 4);
        switch (j->M - m0) {
            case 3: rows_dot(j, n, m0, 3); break;
            case 2: rows_dot(j, n, m0, 2); break;
            case 1: rows_dot(j, n, m0, 1); break;
            default: break;
        }
    }
}

/* The pool shares a job's outputs in units of UNIT rows, each claimed by whichever thread
 * comes first: the caller never waits for a worker that has not started (a busy machine
 * may not schedule it for milliseconds), only for units a worker already holds. Workers
 * spin for SPIN_NS between jobs (a decode step's next matmul comes within microseconds),
 * then sleep on a condition variable. `cursor` is the job's generation (high 32 bits) and
 * its next unclaimed unit: a late worker cannot claim a unit of a newer job. */
#define UNIT 32

static Job job;
static _Atomic uint64_t cursor;
static atomic_uint generation;
static atomic_int finished; /* units of the current job done */
static int created = 1, sleepers = 0;
static pid_t owner = 0;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int claim(uint32_t gen, int units) {
    uint64_t v = atomic_load_explicit(&cursor, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= units) return -1;
        if (atomic_compare_exchange_weak(&cursor, &v, v + 1)) return (int)(uint32_t)v;
    }
}

static void work(const Job *j, uint32_t gen) {
    int units = (j->N + UNIT - 1) / UNIT;
    for (int u; (u = claim(gen, units)) >= 0;) {
        int n1 = (u + 1) * UNIT < j->N ? (u + 1) * UNIT : j->N;
        run_rows(j, u * UNIT, n1);
        atomic_fetch_add_explicit(&finished, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    uint32_t seen = (uint32_t)(uintptr_t)arg; /* the generation when we were created */
    for (;;) {
        long start = now_ns();
        int spins = 0;
        while (atomic_load_explicit(&generation, memory_order_acquire) == seen) {
            _mm_pause();
            if (++spins % 256 == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&lock);
                sleepers++;
                while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &lock);
                sleepers--;
                pthread_mutex_unlock(&lock);
            }
        }
        seen = atomic_load_explicit(&generation, memory_order_acquire);
        /* A copy torn by a newer job is never used: that job's cursor refuses our claims. */
        Job mine = job;
        work(&mine, seen);
    }
    return NULL;
}

static void grow(int threads) {
    if (owner != getpid()) { /* a forked child has none of its parent's workers */
        created = 1;
        owner = getpid();
    }
    while (created < threads) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uintptr_t born = atomic_load(&generation);
        int failed = pthread_create(&t, &attr, worker, (void *)born);
        pthread_attr_destroy(&attr);
        if (failed) break;
        created++;
    }
}

/* y (M, N) fp32 = x (M, K) @ W.T for W held as `bits`-bit levels (see the top). `threads`:
 * how many threads may share the outputs (the caller's is one of them). */
void qgemv(const uint8_t *levels, const float *scales, const uint16_t *offsets, int bits,
           const int8_t *qx, const float *d, const float *dsum, int M, int N, int K,
           float *y, int threads) {
    Job j = {levels, scales, offsets, qx, d, dsum, y, M, N, K, bits};
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > 1 && N >= 4 * UNIT) grow(threads);
    if (threads < 2 || N < 4 * UNIT || created < 2) {
        run_rows(&j, 0, N);
        return;
    }
    job = j;
    atomic_store_explicit(&finished, 0, memory_order_relaxed);
    uint32_t gen = atomic_load(&generation) + 1;
    atomic_store_explicit(&cursor, (uint64_t)gen << 32, memory_order_release);
    atomic_store_explicit(&generation, gen, memory_order_release);
    pthread_mutex_lock(&lock);
    if (sleepers) pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    work(&j, gen);
    int units = (N + UNIT - 1) / UNIT;
    while (atomic_load_explicit(&finished, memory_order_acquire) < units) _mm_pause();
}

/* Sixteen K/V values (fp32 or bf16) as fp32. */
static inline __m512 load16(const void *base, size_t index, int is_bf16) {
    if (!is_bf16) return _mm512_loadu_ps((const float *)base + index);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* One decode row's attention over keys stored in consecutive slots of one layer's pool.
 *
 * `cache`: the layer's pool (2, Hkv, slots, hd), fp32 or bf16; the row's keys are slots
 * first .. first + keys - 1 of each head, the last one the new token's, whose K and V
 * (`k`, `v`: (Hkv, hd), the pool's dtype) are written here first. `q` (H, hd) fp32, query
 * head h reading K/V head h / (H / Hkv); `out` (H, hd) fp32; scores scaled by 1/sqrt(hd),
 * softmax in fp32. `scores`: room for `keys` floats. hd a multiple of 16. */
void qgemv_attend_one(const float *q, const void *k, const void *v, void *cache, int is_bf16,
                      int heads, int kv_heads, int hd, long slots, long first, int keys,
                      float scale, float *scores, float *out) {
    size_t item = is_bf16 ? 2 : 4, plane = (size_t)kv_heads * slots * hd;
    for (int g = 0; g < kv_heads; g++) {
        size_t at = ((size_t)g * slots + first + keys - 1) * hd * item;
        memcpy((char *)cache + at, (const char *)k + (size_t)g * hd * item, hd * item);
        memcpy((char *)cache + plane * item + at, (const char *)v + (size_t)g * hd * item,
               hd * item);
    }
    const int group = heads / kv_heads;
    for (int h = 0; h < heads; h++) {
        size_t head_base = ((size_t)(h / group) * slots + first) * hd;
        const float *qh = q + (size_t)h * hd;
        float top = -3.4e38f;
        for (int p = 0; p < keys; p++) {
            __m512 acc = _mm512_setzero_ps();
            for (int i = 0; i < hd; i += 16)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i),
                                      load16(cache, head_base + (size_t)p * hd + i, is_bf16), acc);
            scores[p] = _mm512_reduce_add_ps(acc) * scale;
            top = scores[p] > top ? scores[p] : top;
        }
        float total = 0.0f;
        for (int p = 0; p < keys; p++) {
            scores[p] = __builtin_expf(scores[p] - top);
            total += scores[p];
        }
        for (int p = 0; p < keys; p++) scores[p] /= total;
        float *oh = out + (size_t)h * hd;
        for (int i = 0; i < hd; i += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (int p = 0; p < keys; p++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[p]),
                                      load16(cache, plane + head_base + (size_t)p * hd + i,
                                             is_bf16),
                                      acc);
            _mm512_storeu_ps(oh + i, acc);
        }
    }
}

/* One packed weight, described once (qgemv.py keeps it next to the tensors). */
typedef struct {
    const uint8_t *levels;
    const float *scales;
    const uint16_t *offsets;
    int bits, N, K;
} Weight;

/* y (M, N) fp32 = x (M, K) fp32 or bf16 @ W.T in one call: x quantized into `scratch`
 * (M * K + 8 * M * K / 32 bytes), then `qgemv`. */
void qgemv_linear(const Weight *w, const void *x, int is_bf16, int M, float *y, void *scratch,
                  int threads) {
    int8_t *qx = (int8_t *)scratch;
    float *d = (float *)(qx + (size_t)M * w->K);
    float *dsum = d + (size_t)M * (w->K / GROUP);
    qgemv_quantize(x, is_bf16, M, w->K, qx, d, dsum);
    qgemv(w->levels, w->scales, w->offsets, w->bits, qx, d, dsum, M, w->N, w->K, y, threads);
}
