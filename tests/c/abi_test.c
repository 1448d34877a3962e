/*
 * C11 test of libflashmla.so, linked through include/flashmla.h only (built with -Werror and run by
 * crates/mla-ffi/tests/c_abi.rs): ABI version, struct layout, backend handles and capabilities, the scheduler
 * step, and a decode on the CPU backend checked against the closed form of tests/c/mla_problem.h.
 */
#include "flashmla.h"
#include "mla_problem.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* The layout a ctypes or other FFI binding relies on. */
_Static_assert(sizeof(flashmla_tensor) == 88, "flashmla_tensor layout");
_Static_assert(offsetof(flashmla_tensor, shape) == 24, "flashmla_tensor.shape offset");
_Static_assert(offsetof(flashmla_tensor, strides) == 56, "flashmla_tensor.strides offset");
_Static_assert(sizeof(flashmla_status) == 4, "flashmla_status is an int32_t");
_Static_assert(offsetof(flashmla_capabilities, page_sizes) == 84, "flashmla_capabilities layout");
_Static_assert(sizeof(flashmla_capabilities) == 152, "flashmla_capabilities size");

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

static void test_version(void) {
    CHECK(flashmla_abi_version() == FLASHMLA_ABI_VERSION, "abi %u", (unsigned)flashmla_abi_version());
    CHECK(strlen(flashmla_version()) > 0, "empty version");
    CHECK(strcmp(flashmla_status_name(FLASHMLA_STATUS_INVALID_ARGUMENT), "FLASHMLA_STATUS_INVALID_ARGUMENT") == 0,
          "%s", flashmla_status_name(FLASHMLA_STATUS_INVALID_ARGUMENT));
    CHECK(strcmp(flashmla_status_name(42), "FLASHMLA_STATUS_UNKNOWN") == 0, "%s", flashmla_status_name(42));
}

static void test_open_errors(void) {
    flashmla_backend *b = (flashmla_backend *)&failures; /* must be overwritten with NULL */
    flashmla_status s = flashmla_backend_open("tpu", 0, &b);
    CHECK(s == FLASHMLA_STATUS_INVALID_ARGUMENT, "status %d", (int)s);
    CHECK(b == NULL, "handle not cleared");
    CHECK(strstr(flashmla_last_error_message(), "backend_name") != NULL, "%s", flashmla_last_error_message());
    s = flashmla_backend_open("cpu", 0, NULL);
    CHECK(s == FLASHMLA_STATUS_INVALID_ARGUMENT, "status %d", (int)s);
    CHECK(strstr(flashmla_last_error_message(), "out_backend") != NULL, "%s", flashmla_last_error_message());

    /* No GPU (or no driver) is a status, never an abort. */
    s = flashmla_backend_open("hopper", 0, &b);
    CHECK(s == FLASHMLA_STATUS_OK || s == FLASHMLA_STATUS_UNAVAILABLE || s == FLASHMLA_STATUS_UNSUPPORTED,
          "hopper: %s: %s", flashmla_status_name(s), flashmla_last_error_message());
    if (s == FLASHMLA_STATUS_OK) {
        CHECK(b != NULL, "hopper handle");
    } else {
        CHECK(b == NULL && strstr(flashmla_last_error_message(), "hopper") != NULL, "%s",
              flashmla_last_error_message());
    }
    flashmla_backend_free(b);
    flashmla_backend_free(NULL);
}

static void test_capabilities(const flashmla_backend *b) {
    flashmla_capabilities caps;
    const uint32_t inputs =
        (1u << FLASHMLA_DTYPE_BF16) | (1u << FLASHMLA_DTYPE_FP16) | (1u << FLASHMLA_DTYPE_E4M3);
    flashmla_status s = flashmla_backend_capabilities(b, &caps);
    CHECK(s == FLASHMLA_STATUS_OK, "%s", flashmla_last_error_message());
    if (s != FLASHMLA_STATUS_OK) return;
    CHECK(strcmp(caps.backend, "cpu") == 0, "backend %s", caps.backend);
    CHECK(caps.device_name != NULL && caps.device_name[0] != '\0', "device name");
    CHECK(caps.device_type == FLASHMLA_DEVICE_TYPE_CPU && caps.device_id == 0, "device %d:%d", caps.device_type,
          caps.device_id);
    CHECK(caps.sm_count >= 1, "sm_count %d", caps.sm_count);
    CHECK(caps.compute_capability_major == 0, "cc %d", caps.compute_capability_major);
    CHECK(caps.dtypes == inputs, "dtypes 0x%x", (unsigned)caps.dtypes);
    CHECK(caps.num_head_dims == 1 && caps.head_dims_k[0] == FLASHMLA_HEAD_DIM_K &&
              caps.head_dims_v[0] == FLASHMLA_HEAD_DIM_V,
          "head dims");
    CHECK(caps.any_page_size == 1 && caps.num_page_sizes == 0, "page sizes");
    CHECK(flashmla_backend_capabilities(NULL, &caps) == FLASHMLA_STATUS_INVALID_ARGUMENT, "null handle");
    CHECK(strstr(flashmla_last_error_message(), "`backend`") != NULL, "%s", flashmla_last_error_message());
}

static void test_decode(const flashmla_backend *b) {
    mla_problem p;
    flashmla_status s;
    float bad_q_dtype_lse;
    CHECK(p_init(&p, b) == 0, "p_init: %s", flashmla_last_error_message());
    CHECK(p.num_sm_parts >= 1, "num_sm_parts %lld", (long long)p.num_sm_parts);

    s = p_schedule(&p, b);
    CHECK(s == FLASHMLA_STATUS_OK, "get_mla_metadata: %s", flashmla_last_error_message());
    CHECK(strcmp(flashmla_last_error_message(), "") == 0, "message after success: %s",
          flashmla_last_error_message());
    CHECK(p_check_schedule(&p) == 0, "schedule");

    s = p_decode(&p, b, NAN);
    CHECK(s == FLASHMLA_STATUS_OK, "decode: %s: %s", flashmla_status_name(s), flashmla_last_error_message());
    if (s == FLASHMLA_STATUS_OK) CHECK(p_check_decode(&p, NAN) == 0, "decode, default scale");

    p_poison_outputs(&p);
    s = p_decode(&p, b, 0.125f);
    CHECK(s == FLASHMLA_STATUS_OK, "decode: %s", flashmla_last_error_message());
    if (s == FLASHMLA_STATUS_OK) CHECK(p_check_decode(&p, 0.125f) == 0, "decode, scale 0.125");

    /* A wrong argument: the status, a message naming it, and untouched outputs. */
    p_poison_outputs(&p);
    p.tq.dtype = FLASHMLA_DTYPE_F32;
    s = p_decode(&p, b, NAN);
    bad_q_dtype_lse = p.lse[0];
    CHECK(s == FLASHMLA_STATUS_INVALID_ARGUMENT, "status %d", (int)s);
    CHECK(strstr(flashmla_last_error_message(), "`q.dtype`") != NULL, "%s", flashmla_last_error_message());
    CHECK(bad_q_dtype_lse == -12345.0f && p.out[0] == 0x1234u, "outputs written on error");
    p_free(&p);
}

int main(void) {
    flashmla_backend *cpu = NULL;
    flashmla_status s;
    test_version();
    test_open_errors();
    s = flashmla_backend_open("cpu", 0, &cpu);
    CHECK(s == FLASHMLA_STATUS_OK && cpu != NULL, "open cpu: %s", flashmla_last_error_message());
    if (cpu) {
        test_capabilities(cpu);
        test_decode(cpu);
    }
    flashmla_backend_free(cpu);
    if (failures) {
        fprintf(stderr, "abi_test.c: %d failure(s)\n", failures);
        return 1;
    }
    printf("abi_test.c: ok\n");
    return 0;
}
