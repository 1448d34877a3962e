/*
 * C11 test of the decode over FP8 caches in libflashmla.so (ABI version 2), linked through include/flashmla.h only
 * (built with -Werror and run by crates/mla-ffi/tests/c_abi.rs): struct layouts, capabilities, quantisation of a
 * V3.2 page, and a sparse decode whose selection names one token twice and skips a -1 and an out-of-range entry,
 * checked against its closed form: out = that token's V row, lse = scale * (q . k) + ln 2.
 */
#include "flashmla.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

_Static_assert(sizeof(flashmla_fp8_decode_params) == 136, "flashmla_fp8_decode_params size");
_Static_assert(offsetof(flashmla_fp8_decode_params, q) == 24, "flashmla_fp8_decode_params.q offset");
_Static_assert(sizeof(flashmla_fp8_capabilities) == 24, "flashmla_fp8_capabilities size");

static int failures;

#define CHECK(cond, ...)                                                             \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                            \
            fputc('\n', stderr);                                                     \
            failures++;                                                              \
        }                                                                            \
    } while (0)

enum { TOKENS = 4, D_QK = 576, D_V = 512, BYTES = 656, HEADS = 2, TOPK = 4, SELECTED = 2 };

static flashmla_tensor tensor(void *data, int32_t dtype, int32_t ndim, const int64_t *shape) {
    flashmla_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device_type = FLASHMLA_DEVICE_TYPE_CPU;
    t.dtype = dtype;
    t.ndim = ndim;
    int64_t stride = 1;
    for (int32_t i = ndim - 1; i >= 0; i--) {
        t.shape[i] = shape[i];
        t.strides[i] = stride;
        stride *= shape[i];
    }
    return t;
}

static float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static float values[TOKENS * D_QK], deq[TOKENS * D_QK];
static uint8_t cache[TOKENS * BYTES];
static uint16_t q[HEADS * D_QK], out[HEADS * D_V];
static float lse[HEADS];

int main(void) {
    flashmla_backend *be = NULL;
    CHECK(flashmla_backend_open("cpu", 0, &be) == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());
    if (!be) return 1;

    flashmla_fp8_capabilities caps;
    CHECK(flashmla_backend_fp8_capabilities(be, &caps) == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());
    CHECK(caps.sparse_layouts == ((1u << FLASHMLA_FP8_LAYOUT_V32) | (1u << FLASHMLA_FP8_LAYOUT_MODEL1)), "%u",
          caps.sparse_layouts);
    CHECK(caps.sparse_features[FLASHMLA_FP8_LAYOUT_MODEL1] & FLASHMLA_SPARSE_EXTRA_CACHE, "no extra cache");

    /* One page of 4 tokens: token j, column c holds (j + 1) * ((c % 7) - 3) / 64. */
    for (int j = 0; j < TOKENS; j++)
        for (int c = 0; c < D_QK; c++) values[j * D_QK + c] = (float)(j + 1) * (float)((c % 7) - 3) / 64.0f;
    const int64_t vshape[4] = {1, TOKENS, 1, D_QK}, cshape[4] = {1, TOKENS, 1, BYTES};
    flashmla_tensor tv = tensor(values, FLASHMLA_DTYPE_F32, 4, vshape), tc = tensor(cache, FLASHMLA_DTYPE_U8, 4, cshape);
    flashmla_tensor td = tensor(deq, FLASHMLA_DTYPE_F32, 4, vshape);
    CHECK(flashmla_fp8_quantize(&tv, &tc) == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());
    CHECK(flashmla_fp8_dequantize(&tc, &td) == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());
    /* These values are exact in E4M3 at the tile's power-of-two scale, so the round trip is exact. */
    CHECK(memcmp(values, deq, sizeof values) == 0, "quantise/dequantise is not exact");

    for (int i = 0; i < HEADS * D_QK; i++) q[i] = 0x3F80; /* bf16 1.0 */
    /* Token 2 twice, a -1, and an index past the cache (4 tokens): both skipped. */
    int32_t indices[TOPK] = {2, -1, 2, 1000};
    int64_t parts = 0;
    CHECK(flashmla_fp8_num_sm_parts(be, 1, HEADS, &parts) == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());
    int32_t meta[64 * FLASHMLA_METADATA_WORDS], splits[2];
    CHECK(parts >= 1 && parts <= 64, "%lld parts", (long long)parts);

    const int64_t qshape[4] = {1, 1, HEADS, D_QK}, ishape[3] = {1, 1, TOPK}, mshape[2] = {parts, FLASHMLA_METADATA_WORDS};
    const int64_t sshape[1] = {2}, oshape[4] = {1, 1, HEADS, D_V}, lshape[3] = {1, HEADS, 1};
    flashmla_tensor tq = tensor(q, FLASHMLA_DTYPE_BF16, 4, qshape), ti = tensor(indices, FLASHMLA_DTYPE_I32, 3, ishape);
    flashmla_tensor tm = tensor(meta, FLASHMLA_DTYPE_I32, 2, mshape), ts = tensor(splits, FLASHMLA_DTYPE_I32, 1, sshape);
    flashmla_tensor to = tensor(out, FLASHMLA_DTYPE_BF16, 4, oshape), tl = tensor(lse, FLASHMLA_DTYPE_F32, 3, lshape);

    flashmla_fp8_decode_params p;
    memset(&p, 0, sizeof p);
    p.struct_size = sizeof p;
    p.head_dim_v = D_V;
    p.softmax_scale = NAN;
    p.q = &tq;
    p.k_cache = &tc;
    p.indices = &ti;
    p.tile_scheduler_metadata = &tm;
    p.num_splits = &ts;
    p.out = &to;
    p.lse = &tl;
    CHECK(flashmla_fp8_get_metadata(be, &p, NULL) == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());
    CHECK(flashmla_fp8_decode(be, &p, NULL, 0, NULL) == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());

    double dot = 0;
    for (int c = 0; c < D_QK; c++) dot += deq[2 * D_QK + c];
    double want_lse = dot / sqrt((double)D_QK) + log((double)SELECTED);
    for (int h = 0; h < HEADS; h++) {
        CHECK(fabs(lse[h] - want_lse) < 1e-4, "head %d: lse %f, want %f", h, (double)lse[h], want_lse);
        for (int c = 0; c < D_V; c++)
            CHECK(bf16_to_float(out[h * D_V + c]) == deq[2 * D_QK + c], "head %d col %d: %f vs %f", h, c,
                  (double)bf16_to_float(out[h * D_V + c]), (double)deq[2 * D_QK + c]);
    }

    /* A bad argument is named. */
    p.struct_size = 8;
    CHECK(flashmla_fp8_decode(be, &p, NULL, 0, NULL) == FLASHMLA_STATUS_INVALID_ARGUMENT, "bad struct_size accepted");
    CHECK(strstr(flashmla_last_error_message(), "`params.struct_size`") != NULL, "%s", flashmla_last_error_message());

    flashmla_backend_free(be);
    if (failures) return 1;
    printf("fp8_test.c: ok\n");
    return 0;
}
