// The public header must stand alone in C++20 too, with every warning an
// error (see check_header.py), and give the same layout as in C.
#include "kloop.h"
#include "kloop.h"  // the include guard works

#include <cstddef>
#include <cstdint>
#include <type_traits>

static_assert(sizeof(kloop_completion) == 32);
static_assert(offsetof(kloop_completion, token) == 0);
static_assert(offsetof(kloop_completion, result) == 8);
static_assert(offsetof(kloop_completion, flags) == 12);
static_assert(offsetof(kloop_completion, data) == 16);
static_assert(offsetof(kloop_completion, event) == 24);
static_assert(offsetof(kloop_completion, aux) == 28);
static_assert(sizeof(kloop_caps) == 360);
static_assert(sizeof(kloop_config) == 88);
static_assert(sizeof(kloop_stats) == 136);

// Public structs are plain data, so any FFI can lay them out.
static_assert(std::is_standard_layout_v<kloop_completion> &&
              std::is_trivially_copyable_v<kloop_completion>);
static_assert(std::is_standard_layout_v<kloop_caps> && std::is_trivially_copyable_v<kloop_caps>);
static_assert(std::is_standard_layout_v<kloop_config> &&
              std::is_trivially_copyable_v<kloop_config>);
static_assert(std::is_standard_layout_v<kloop_stats> && std::is_trivially_copyable_v<kloop_stats>);

// The prototypes have C linkage and the documented types.
static_assert(std::is_same_v<decltype(&kloop_version), std::uint32_t (*)()>);
static_assert(std::is_same_v<decltype(&kloop_poll),
                             int (*)(kloop_t *, kloop_completion *, std::uint32_t, std::int64_t)>);
static_assert(
    std::is_same_v<decltype(&kloop_stream_write),
                   std::int64_t (*)(kloop_t *, std::uint64_t, const void *, std::size_t)>);

int header_cxx_check();
int header_cxx_check() {
  auto *volatile v = &kloop_version;
  return v != nullptr;
}
