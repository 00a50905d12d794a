// Kernel capability probe, shared by kloop_probe() and loop creation.
#pragma once

#include <cstdint>

namespace kl {

struct ProbeResult {
  uint32_t features = 0;  // IORING_FEAT_*
  uint64_t caps = 0;      // KLOOP_CAP_*
  uint8_t opcodes[256] = {};
};

// Returns 0 or -errno of io_uring_setup(2). Successful results are cached
// for the life of the process (the kernel does not change under it).
int probe_kernel(ProbeResult *out);

}  // namespace kl
