/*
 * A small decode problem whose answer is known in closed form, shared by tests/c/abi_test.c (C11) and
 * tests/cpp/abi_test.cpp (C++17); written in the common subset of both languages. Only include/flashmla.h is
 * used to talk to the library.
 *
 * Every cached token of request r has the same K row k_r, so softmax weights are uniform and
 *     out[r, t, h, :] = k_r[:512]                    (V is the first 512 columns of K)
 *     lse[r, h, t]    = ln(s_k) + scale * (q_h . k_r)
 * and a request of length 0 gives out = 0, lse = +inf. All inputs are small multiples of powers of two, exactly
 * representable in bf16, so out is exact. The cache is poisoned with NaN everywhere no token lives (rows past a
 * request's length, a page no request uses) and block-table entries past a request's last page hold garbage, as
 * engines leave them: the library must never read either.
 */
#ifndef MLA_PROBLEM_H
#define MLA_PROBLEM_H

#include "flashmla.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define P_BATCH 3
#define P_SQ 1
#define P_HQ 4
#define P_HKV 1
#define P_PAGE 16
#define P_MAXBLK 3
#define P_NUMBLK 5
#define P_GARBAGE 2147480000
#define P_BF16_NAN 0x7FC0u

static const int32_t p_seqlens[P_BATCH] = {5, 0, 40};
/* Request 2 uses pages 0, 4, 1 (permuted); page 2 is never used; unused entries are garbage. */
static const int32_t p_block_table[P_BATCH][P_MAXBLK] = {
    {3, P_GARBAGE, P_GARBAGE},
    {P_GARBAGE, P_GARBAGE, -1},
    {0, 4, 1},
};

/* Column c of request r's K row, and of head h's query. */
static inline float p_k(int r, int c) { return (float)((c % 7) - 3) / 16.0f * (float)(r + 1); }
static inline float p_q(int h, int c) { return (float)((c % 5) - 2) / 32.0f * (float)(h + 1); }

/* Exact for the values above (at most 8 significant bits). */
static inline uint16_t p_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (uint16_t)(u >> 16);
}
static inline float p_from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* A contiguous host tensor descriptor. */
static inline flashmla_tensor p_tensor(void *data, int32_t dtype, int32_t ndim, const int64_t *shape) {
    flashmla_tensor t;
    int64_t stride = 1;
    int i;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device_type = FLASHMLA_DEVICE_TYPE_CPU;
    t.device_id = 0;
    t.dtype = dtype;
    t.ndim = ndim;
    for (i = ndim - 1; i >= 0; i--) {
        t.shape[i] = shape[i];
        t.strides[i] = stride;
        stride *= shape[i];
    }
    return t;
}

typedef struct mla_problem {
    uint16_t *q, *kv, *out;
    int32_t *block_table, *seqlens, *meta, *splits;
    float *lse;
    void *workspace;
    int64_t num_sm_parts, workspace_bytes;
    flashmla_tensor tq, tkv, tbt, tsl, tmeta, tsplits, tout, tlse;
} mla_problem;

#define P_OUT_ELEMS ((size_t)P_BATCH * P_SQ * P_HQ * FLASHMLA_HEAD_DIM_V)
#define P_LSE_ELEMS ((size_t)P_BATCH * P_HQ * P_SQ)

/* Fills out and lse with a sentinel (to detect writes on failed calls). */
static inline void p_poison_outputs(mla_problem *p) {
    size_t i;
    for (i = 0; i < P_OUT_ELEMS; i++) p->out[i] = 0x1234u;
    for (i = 0; i < P_LSE_ELEMS; i++) p->lse[i] = -12345.0f;
}

/* Allocates and fills the problem; sizes come from the library's size queries. Returns 0 on success. */
static inline int p_init(mla_problem *p, const flashmla_backend *backend) {
    const int64_t q_shape[4] = {P_BATCH, P_SQ, P_HQ, FLASHMLA_HEAD_DIM_K};
    const int64_t kv_shape[4] = {P_NUMBLK, P_PAGE, P_HKV, FLASHMLA_HEAD_DIM_K};
    const int64_t bt_shape[2] = {P_BATCH, P_MAXBLK};
    const int64_t sl_shape[1] = {P_BATCH};
    const int64_t splits_shape[1] = {P_BATCH + 1};
    const int64_t out_shape[4] = {P_BATCH, P_SQ, P_HQ, FLASHMLA_HEAD_DIM_V};
    const int64_t lse_shape[3] = {P_BATCH, P_HQ, P_SQ};
    size_t kv_elems = (size_t)P_NUMBLK * P_PAGE * P_HKV * FLASHMLA_HEAD_DIM_K;
    int64_t meta_shape[2];
    int r, t, h, c, j;

    memset(p, 0, sizeof *p);
    if (flashmla_num_sm_parts(backend, P_SQ * P_HQ / P_HKV, P_HKV, &p->num_sm_parts) != FLASHMLA_STATUS_OK) return 1;
    if (flashmla_workspace_size(backend, P_BATCH, P_SQ, P_HQ, P_HKV, FLASHMLA_DTYPE_BF16, &p->workspace_bytes) !=
        FLASHMLA_STATUS_OK)
        return 1;
    meta_shape[0] = p->num_sm_parts;
    meta_shape[1] = FLASHMLA_METADATA_WORDS;

    p->q = (uint16_t *)malloc((size_t)P_BATCH * P_SQ * P_HQ * FLASHMLA_HEAD_DIM_K * sizeof(uint16_t));
    p->kv = (uint16_t *)malloc(kv_elems * sizeof(uint16_t));
    p->out = (uint16_t *)malloc(P_OUT_ELEMS * sizeof(uint16_t));
    p->lse = (float *)malloc(P_LSE_ELEMS * sizeof(float));
    p->block_table = (int32_t *)malloc(sizeof p_block_table);
    p->seqlens = (int32_t *)malloc(sizeof p_seqlens);
    p->meta = (int32_t *)malloc((size_t)p->num_sm_parts * FLASHMLA_METADATA_WORDS * sizeof(int32_t));
    p->splits = (int32_t *)malloc((P_BATCH + 1) * sizeof(int32_t));
    p->workspace = malloc((size_t)p->workspace_bytes);
    if (!p->q || !p->kv || !p->out || !p->lse || !p->block_table || !p->seqlens || !p->meta || !p->splits ||
        !p->workspace)
        return 1;

    memcpy(p->block_table, p_block_table, sizeof p_block_table);
    memcpy(p->seqlens, p_seqlens, sizeof p_seqlens);
    for (r = 0; r < P_BATCH; r++)
        for (t = 0; t < P_SQ; t++)
            for (h = 0; h < P_HQ; h++)
                for (c = 0; c < FLASHMLA_HEAD_DIM_K; c++)
                    p->q[((r * P_SQ + t) * P_HQ + h) * FLASHMLA_HEAD_DIM_K + c] = p_to_bf16(p_q(h, c));
    for (j = 0; j < (int)kv_elems; j++) p->kv[j] = P_BF16_NAN;
    for (r = 0; r < P_BATCH; r++)
        for (j = 0; j < p_seqlens[r]; j++) {
            int page = p_block_table[r][j / P_PAGE], row = j % P_PAGE, g;
            for (g = 0; g < P_HKV; g++)
                for (c = 0; c < FLASHMLA_HEAD_DIM_K; c++)
                    p->kv[((page * P_PAGE + row) * P_HKV + g) * FLASHMLA_HEAD_DIM_K + c] = p_to_bf16(p_k(r, c));
        }
    p_poison_outputs(p);

    p->tq = p_tensor(p->q, FLASHMLA_DTYPE_BF16, 4, q_shape);
    p->tkv = p_tensor(p->kv, FLASHMLA_DTYPE_BF16, 4, kv_shape);
    p->tbt = p_tensor(p->block_table, FLASHMLA_DTYPE_I32, 2, bt_shape);
    p->tsl = p_tensor(p->seqlens, FLASHMLA_DTYPE_I32, 1, sl_shape);
    p->tmeta = p_tensor(p->meta, FLASHMLA_DTYPE_I32, 2, meta_shape);
    p->tsplits = p_tensor(p->splits, FLASHMLA_DTYPE_I32, 1, splits_shape);
    p->tout = p_tensor(p->out, FLASHMLA_DTYPE_BF16, 4, out_shape);
    p->tlse = p_tensor(p->lse, FLASHMLA_DTYPE_F32, 3, lse_shape);
    return 0;
}

static inline void p_free(mla_problem *p) {
    free(p->q);
    free(p->kv);
    free(p->out);
    free(p->lse);
    free(p->block_table);
    free(p->seqlens);
    free(p->meta);
    free(p->splits);
    free(p->workspace);
    memset(p, 0, sizeof *p);
}

static inline flashmla_status p_schedule(mla_problem *p, const flashmla_backend *backend) {
    return flashmla_get_mla_metadata(backend, &p->tsl, P_SQ * P_HQ / P_HKV, P_HKV, &p->tmeta, &p->tsplits, NULL);
}

/* scale: NaN selects the library default (576^-0.5). */
static inline flashmla_status p_decode(mla_problem *p, const flashmla_backend *backend, float scale) {
    return flashmla_with_kvcache(backend, &p->tq, &p->tkv, &p->tbt, &p->tsl, FLASHMLA_HEAD_DIM_V, &p->tmeta,
                                 &p->tsplits, scale, 0, NULL, NULL, &p->tout, &p->tlse, p->workspace,
                                 p->workspace_bytes, NULL);
}

/* Checks the scheduler's output for consistency; returns the number of violations (printed). */
static inline int p_check_schedule(const mla_problem *p) {
    int bad = 0, r, part;
    if (p->splits[0] != 0) {
        fprintf(stderr, "num_splits[0] = %d, expected 0\n", (int)p->splits[0]);
        bad++;
    }
    for (r = 0; r < P_BATCH; r++)
        if (p->splits[r + 1] - p->splits[r] < 1) {
            fprintf(stderr, "request %d has %d splits\n", r, (int)(p->splits[r + 1] - p->splits[r]));
            bad++;
        }
    if (p->splits[P_BATCH] > P_BATCH + p->num_sm_parts) {
        fprintf(stderr, "%d splits exceed batch + num_sm_parts\n", (int)p->splits[P_BATCH]);
        bad++;
    }
    for (part = 0; part < p->num_sm_parts; part++) {
        const int32_t *w = p->meta + part * FLASHMLA_METADATA_WORDS;
        int empty = w[0] > w[1];
        if (!empty && (w[0] < 0 || w[1] >= P_BATCH)) {
            fprintf(stderr, "part %d: requests %d..%d out of range\n", part, (int)w[0], (int)w[1]);
            bad++;
        }
        if (w[7] != 0) {
            fprintf(stderr, "part %d: pad word %d\n", part, (int)w[7]);
            bad++;
        }
    }
    return bad;
}

/* Compares out and lse with the closed form; returns the number of mismatches (the first few are printed). */
static inline int p_check_decode(const mla_problem *p, float scale) {
    const double s = isnan(scale) ? 1.0 / 24.0 : (double)scale; /* 576^-0.5 = 1/24 */
    int bad = 0, r, t, h, c;
    for (r = 0; r < P_BATCH; r++)
        for (t = 0; t < P_SQ; t++)
            for (h = 0; h < P_HQ; h++) {
                const uint16_t *o = p->out + ((r * P_SQ + t) * P_HQ + h) * FLASHMLA_HEAD_DIM_V;
                float lse = p->lse[(r * P_HQ + h) * P_SQ + t];
                double dot = 0.0, want_lse;
                for (c = 0; c < FLASHMLA_HEAD_DIM_K; c++) dot += (double)p_q(h, c) * (double)p_k(r, c);
                want_lse = p_seqlens[r] == 0 ? INFINITY : log((double)p_seqlens[r]) + s * dot;
                if (p_seqlens[r] == 0 ? !(isinf(lse) && lse > 0)
                                      : !(fabs((double)lse - want_lse) <= 1e-4 * (1.0 + fabs(want_lse)))) {
                    if (bad++ < 5)
                        fprintf(stderr, "lse[%d,%d,%d] = %.7g, expected %.7g\n", r, h, t, (double)lse, want_lse);
                }
                for (c = 0; c < FLASHMLA_HEAD_DIM_V; c++) {
                    float got = p_from_bf16(o[c]);
                    float want = p_seqlens[r] == 0 ? 0.0f : p_k(r, c);
                    if (got != want && bad++ < 5)
                        fprintf(stderr, "out[%d,%d,%d,%d] = %g, expected %g\n", r, t, h, c, (double)got,
                                (double)want);
                }
            }
    return bad;
}

#endif /* MLA_PROBLEM_H */
