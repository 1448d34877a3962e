// C++17 test of libflashmla.so through include/flashmla.h only (built with -Werror and run by
// crates/mla-ffi/tests/c_abi.rs): the header in C++ (enums with int32_t underlying type, extern "C"), an RAII
// handle, and one handle shared by several threads, each running the scheduler and decode steps on its own
// buffers and checking the closed-form answer of tests/c/mla_problem.h.
#include "flashmla.h"
#include "mla_problem.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

static_assert(std::is_same_v<std::underlying_type_t<flashmla_status>, int32_t>, "status is int32_t");
static_assert(sizeof(flashmla_tensor) == 88, "flashmla_tensor layout");
static_assert(std::is_standard_layout_v<flashmla_tensor> && std::is_trivially_copyable_v<flashmla_tensor>,
              "flashmla_tensor is a C struct");

namespace {

struct BackendDeleter {
    void operator()(flashmla_backend* b) const noexcept { flashmla_backend_free(b); }
};
using Backend = std::unique_ptr<flashmla_backend, BackendDeleter>;

// Opens a backend or throws with the library's message.
Backend open_backend(const char* name) {
    flashmla_backend* raw = nullptr;
    flashmla_status s = flashmla_backend_open(name, 0, &raw);
    if (s != FLASHMLA_STATUS_OK)
        throw std::runtime_error(std::string(flashmla_status_name(s)) + ": " + flashmla_last_error_message());
    return Backend(raw);
}

constexpr int kThreads = 6;
constexpr int kRounds = 8;

// One thread's work: its own buffers, the shared handle; returns a description of the first failure, or "".
std::string worker(const flashmla_backend* backend, int id) {
    mla_problem p;
    if (p_init(&p, backend) != 0) return "p_init failed";
    std::string err;
    for (int round = 0; round < kRounds && err.empty(); round++) {
        // Alternate the default scale (NaN) and an explicit one so threads run different problems at once.
        const float scale = (id + round) % 2 ? 0.0625f : NAN;
        p_poison_outputs(&p);
        flashmla_status s = p_schedule(&p, backend);
        if (s == FLASHMLA_STATUS_OK) s = p_decode(&p, backend, scale);
        if (s != FLASHMLA_STATUS_OK) {
            err = std::string(flashmla_status_name(s)) + ": " + flashmla_last_error_message();
        } else if (p_check_schedule(&p) != 0 || p_check_decode(&p, scale) != 0) {
            err = "wrong result in round " + std::to_string(round);
        } else if (std::strcmp(flashmla_last_error_message(), "") != 0) {
            err = "stale message after success";
        }
        // A failing call on this thread must not disturb the others' messages.
        if (err.empty() && round == kRounds / 2) {
            flashmla_tensor saved = p.tlse;
            p.tlse.ndim = 7;
            s = p_decode(&p, backend, NAN);
            std::string msg = flashmla_last_error_message();
            p.tlse = saved;
            if (s != FLASHMLA_STATUS_INVALID_ARGUMENT || msg.find("`lse.ndim`") == std::string::npos)
                err = "bad lse.ndim gave " + std::string(flashmla_status_name(s)) + ": " + msg;
        }
    }
    p_free(&p);
    return err;
}

}  // namespace

int main() {
    try {
        Backend cpu = open_backend("cpu");
        flashmla_capabilities caps;
        if (flashmla_backend_capabilities(cpu.get(), &caps) != FLASHMLA_STATUS_OK) throw std::runtime_error("caps");
        std::printf("abi_test.cpp: backend %s on %s, %d workers, ABI %u, library %s\n", caps.backend,
                    caps.device_name, caps.sm_count, flashmla_abi_version(), flashmla_version());

        std::vector<std::string> errors(kThreads);
        std::vector<std::thread> threads;
        for (int i = 0; i < kThreads; i++)
            threads.emplace_back([&, i] { errors[i] = worker(cpu.get(), i); });
        for (auto& t : threads) t.join();

        int failures = 0;
        for (int i = 0; i < kThreads; i++)
            if (!errors[i].empty()) {
                std::fprintf(stderr, "thread %d: %s\n", i, errors[i].c_str());
                failures++;
            }
        if (failures) return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "abi_test.cpp: %s\n", e.what());
        return 1;
    }
    std::printf("abi_test.cpp: ok\n");
    return 0;
}
