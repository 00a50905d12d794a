// Loop lifecycle: config defaults, create/destroy, config validation,
// capabilities, version and the small query functions.
#include <cstddef>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common.h"

using namespace kt;

namespace {

constexpr uint64_t kAllCaps = (UINT64_C(1) << 17) - 1;

TEST(Lifecycle, VersionMatchesHeader) {
  EXPECT_EQ(kloop_version(), static_cast<uint32_t>(KLOOP_VERSION));
}

TEST(Lifecycle, ConfigInitFillsDefaults) {
  kloop_config c;
  std::memset(&c, 0xA5, sizeof c);
  ASSERT_EQ(kloop_config_init(&c), 0);
  EXPECT_EQ(c.size, sizeof(kloop_config));
  EXPECT_EQ(c.sq_entries, 256u);
  EXPECT_EQ(c.cq_entries, 4u * 256u);
  EXPECT_EQ(c.flags, 0u);
  EXPECT_EQ(c.disable, 0u);
  EXPECT_EQ(c.buf_size, 65536u);
  EXPECT_EQ(c.buf_count, 256u);
  EXPECT_EQ(c.sqpoll_idle_ms, 1000u);
}

TEST(Lifecycle, ConfigInitNull) { EXPECT_EQ(kloop_config_init(nullptr), -EINVAL); }

TEST(Lifecycle, CreateWithNullConfigUsesDefaults) {
  kloop_t *loop = nullptr;
  ASSERT_EQ(kloop_create(nullptr, &loop), 0);
  ASSERT_NE(loop, nullptr);
  kloop_caps caps{};
  caps.size = sizeof caps;
  ASSERT_EQ(kloop_get_caps(loop, &caps), 0);
  EXPECT_GE(caps.sq_entries, 256u);
  EXPECT_GE(caps.cq_entries, caps.sq_entries);
  EXPECT_EQ(caps.buf_size, 65536u);
  EXPECT_EQ(caps.buf_count, 256u);
  EXPECT_EQ(caps.enabled, caps.kernel);
  EXPECT_EQ(kloop_destroy(loop), 0);
}

TEST(Lifecycle, CreateWithCustomConfig) {
  kloop_config c = DefaultConfig();
  c.sq_entries = 64;
  c.cq_entries = 512;
  c.buf_size = 4096;
  c.buf_count = 16;
  Driver d(&c);
  ASSERT_EQ(d.create_rc(), 0);
  kloop_caps caps = GetCaps(d);
  EXPECT_EQ(caps.sq_entries, 64u);
  EXPECT_EQ(caps.cq_entries, 512u);
  EXPECT_EQ(caps.buf_size, 4096u);
  EXPECT_EQ(caps.buf_count, 16u);
  uint64_t base = 0, size = 0;
  ASSERT_EQ(kloop_buffer_arena(d, &base, &size), 0);
  EXPECT_NE(base, 0u);
  EXPECT_GE(size, 4096u * 16u);
  // And it works.
  ASSERT_EQ(kloop_submit_nop(d, 1), 0);
  EXPECT_EQ(d.WaitFinal(1).result, 0);
}

TEST(Lifecycle, CreateAcceptsLargerFutureConfig) {
  struct {
    kloop_config c;
    uint64_t future[4];
  } big{};
  kloop_config_init(&big.c);
  big.c.size = sizeof big;
  kloop_t *loop = nullptr;
  ASSERT_EQ(kloop_create(&big.c, &loop), 0);
  EXPECT_EQ(kloop_destroy(loop), 0);
}

TEST(Lifecycle, CreateOutNull) { EXPECT_EQ(kloop_create(nullptr, nullptr), -EINVAL); }

struct BadConfig {
  const char *name;
  void (*mutate)(kloop_config &);
};

class LifecycleBadConfig : public ::testing::TestWithParam<BadConfig> {};

TEST_P(LifecycleBadConfig, IsRejectedWithEinvalAndOutUntouched) {
  kloop_config c = DefaultConfig();
  GetParam().mutate(c);
  kloop_t *sentinel = reinterpret_cast<kloop_t *>(uintptr_t{0x1234});
  kloop_t *out = sentinel;
  int rc = kloop_create(&c, &out);
  EXPECT_EQ(rc, -EINVAL);
  EXPECT_EQ(out, sentinel) << "*out changed on failure";
  if (rc == 0 && out != sentinel) kloop_destroy(out);
}

const BadConfig kBadConfigs[] = {
    {"SizeZero", [](kloop_config &c) { c.size = 0; }},
    {"SizeTooSmall", [](kloop_config &c) { c.size = 8; }},
    {"SizeLacksLastField",
     [](kloop_config &c) { c.size = offsetof(kloop_config, sqpoll_idle_ms); }},
    {"SqZero", [](kloop_config &c) { c.sq_entries = 0; }},
    {"SqTooBig",
     [](kloop_config &c) {
       c.sq_entries = 32769;
       c.cq_entries = 65536 * 2;
     }},
    {"SqHuge",
     [](kloop_config &c) {
       c.sq_entries = UINT32_MAX;
       c.cq_entries = UINT32_MAX;
     }},
    {"CqBelowSq",
     [](kloop_config &c) {
       c.sq_entries = 64;
       c.cq_entries = 32;
     }},
    {"BufCountZero", [](kloop_config &c) { c.buf_count = 0; }},
    {"BufCountNotPow2", [](kloop_config &c) { c.buf_count = 3; }},
    {"BufCountNotPow2Large", [](kloop_config &c) { c.buf_count = 1000; }},
    {"BufCountTooBig", [](kloop_config &c) { c.buf_count = 65536; }},
    {"BufSizeTooSmall", [](kloop_config &c) { c.buf_size = 255; }},
    {"BufSizeZero", [](kloop_config &c) { c.buf_size = 0; }},
    {"BufSizeTooBig", [](kloop_config &c) { c.buf_size = (1u << 20) + 1; }},
    {"UnknownFlag", [](kloop_config &c) { c.flags = 1u << 31; }},
    {"UnknownFlagLow", [](kloop_config &c) { c.flags = 1u << 6; }},  // the first unused bit
};

INSTANTIATE_TEST_SUITE_P(All, LifecycleBadConfig, ::testing::ValuesIn(kBadConfigs),
                         [](const auto &info) { return std::string(info.param.name); });

TEST(Lifecycle, BoundaryConfigsAreAccepted) {
  struct {
    uint32_t sq, cq, bsize, bcount;
  } ok[] = {{1, 1, 256, 1}, {32768, 32768 * 2, 256, 2}, {8, 8, 1u << 20, 4}, {16, 64, 4096, 32768}};
  for (auto &o : ok) {
    kloop_config c = DefaultConfig();
    c.sq_entries = o.sq;
    c.cq_entries = o.cq;
    c.buf_size = o.bsize;
    c.buf_count = o.bcount;
    kloop_t *loop = nullptr;
    int rc = kloop_create(&c, &loop);
    EXPECT_EQ(rc, 0) << "sq=" << o.sq << " cq=" << o.cq << " buf_size=" << o.bsize
                     << " buf_count=" << o.bcount << ": " << kloop_strerror(rc);
    if (rc == 0) {
      ASSERT_EQ(kloop_submit_nop(loop, 7), 0);
      kloop_completion out[2];
      EXPECT_EQ(kloop_poll(loop, out, 2, 1000 * kMs), 1);
      EXPECT_EQ(kloop_destroy(loop), 0);
    }
  }
}

TEST(Lifecycle, SqpollLoopWorks) {
  kloop_config c = DefaultConfig();
  c.flags = KLOOP_CONFIG_SQPOLL;
  c.sqpoll_idle_ms = 10;
  Driver d(&c);
  ASSERT_EQ(d.create_rc(), 0) << kloop_strerror(d.create_rc());
  EXPECT_EQ(GetCaps(d).enabled & KLOOP_CAP_DEFER_TASKRUN, 0u);
  auto [a, b] = UnixPair();
  char buf[8] = {};
  ASSERT_EQ(kloop_submit_recv(d, 1, a, buf, sizeof buf, 0), 0);
  ASSERT_EQ(kloop_submit_send(d, 2, b, "sq", 2, 0), 0);
  EXPECT_EQ(d.WaitFinal(2).result, 2);
  EXPECT_EQ(d.WaitFinal(1).result, 2);
  EXPECT_EQ(std::string(buf, 2), "sq");
  // After the kernel thread went idle, new work still gets submitted.
  std::this_thread::sleep_for(30ms);
  ASSERT_EQ(kloop_submit_nop(d, 3), 0);
  EXPECT_EQ(d.WaitFinal(3).result, 0);
}

TEST(Lifecycle, DestroyTwiceGivesEbadf) {
  kloop_t *loop = nullptr;
  ASSERT_EQ(kloop_create(nullptr, &loop), 0);
  EXPECT_EQ(kloop_destroy(loop), 0);
  EXPECT_EQ(kloop_destroy(loop), -EBADF);
  EXPECT_EQ(kloop_destroy(nullptr), -EBADF);
}

TEST(Lifecycle, ManyLoopsAtOnce) {
  std::vector<kloop_t *> loops(16, nullptr);
  for (auto &l : loops) ASSERT_EQ(kloop_create(nullptr, &l), 0);
  for (size_t i = 0; i < loops.size(); ++i) ASSERT_EQ(kloop_submit_nop(loops[i], i), 0);
  for (size_t i = 0; i < loops.size(); ++i) {
    kloop_completion c{};
    ASSERT_EQ(kloop_poll(loops[i], &c, 1, 1000 * kMs), 1);
    EXPECT_EQ(c.token, i);
  }
  for (auto *l : loops) EXPECT_EQ(kloop_destroy(l), 0);
}

TEST(Lifecycle, ProbeReportsKernel) {
  kloop_caps caps;
  std::memset(&caps, 0xA5, sizeof caps);
  caps.size = sizeof caps;
  ASSERT_EQ(kloop_probe(&caps), 0);
  EXPECT_EQ(caps.enabled, caps.kernel);
  EXPECT_EQ(caps.sq_entries, 0u);
  EXPECT_EQ(caps.cq_entries, 0u);
  EXPECT_EQ(caps.kernel & ~kAllCaps, 0u) << "unknown capability bits";
  EXPECT_EQ(caps.opcodes[0], 1) << "IORING_OP_NOP must be supported";
  // The kernel this suite runs on (6.18) has every capability of 0.1.
  EXPECT_EQ(caps.kernel & kAllCaps, kAllCaps) << std::hex << caps.kernel;
}

TEST(Lifecycle, ProbeArgumentErrors) {
  EXPECT_EQ(kloop_probe(nullptr), -EINVAL);
  kloop_caps caps{};
  caps.size = 4;
  EXPECT_EQ(kloop_probe(&caps), -EINVAL);
  caps.size = 0;
  EXPECT_EQ(kloop_probe(&caps), -EINVAL);
}

TEST(Lifecycle, GetCapsOfLoopMatchesProbe) {
  kloop_caps probe{};
  probe.size = sizeof probe;
  ASSERT_EQ(kloop_probe(&probe), 0);
  Driver d(nullptr);
  ASSERT_EQ(d.create_rc(), 0);
  kloop_caps caps = GetCaps(d);
  EXPECT_EQ(caps.kernel, probe.kernel);
  EXPECT_EQ(caps.enabled, caps.kernel);
  EXPECT_NE(caps.features, 0u);
  EXPECT_EQ(std::memcmp(caps.opcodes, probe.opcodes, sizeof caps.opcodes), 0);
  kloop_caps small{};
  small.size = 4;
  EXPECT_EQ(kloop_get_caps(d, &small), -EINVAL);
  EXPECT_EQ(kloop_get_caps(d, nullptr), -EINVAL);
}

class LifecycleDisable : public ::testing::TestWithParam<uint64_t> {};

TEST_P(LifecycleDisable, EnabledIsKernelMinusDisable) {
  kloop_config c = DefaultConfig();
  c.disable = GetParam();
  Driver d(&c);
  ASSERT_EQ(d.create_rc(), 0);
  kloop_caps caps = GetCaps(d);
  EXPECT_EQ(caps.enabled, ExpectedEnabled(caps.kernel, c.disable, c.flags))
      << std::hex << "kernel=" << caps.kernel << " enabled=" << caps.enabled;
  EXPECT_EQ(caps.enabled & c.disable, 0u);
  ASSERT_EQ(kloop_submit_nop(d, 3), 0);
  EXPECT_EQ(d.WaitFinal(3).result, 0);
}

INSTANTIATE_TEST_SUITE_P(Bits, LifecycleDisable,
                         ::testing::Values(KLOOP_CAP_MULTISHOT_RECV, KLOOP_CAP_WAITID,
                                           KLOOP_CAP_EXT_ARG, KLOOP_CAP_MULTISHOT_POLL,
                                           KLOOP_CAP_MULTISHOT_ACCEPT, KLOOP_CAP_BUF_RING,
                                           KLOOP_CAP_SEND_ZC,
                                           KLOOP_CAP_RECV_BUNDLE | KLOOP_CAP_BUF_RING_INC,
                                           KLOOP_CAP_SPLICE | KLOOP_CAP_PIDFD,
                                           KLOOP_CAP_REG_RING_FD | KLOOP_CAP_SOCKET_OP,
                                           KLOOP_CAP_SINGLE_ISSUER, KLOOP_CAP_DEFER_TASKRUN,
                                           // Unknown bits are simply absent.
                                           UINT64_C(1) << 40));

TEST(Lifecycle, RingFdIsAnOpenFd) {
  Driver d(nullptr);
  ASSERT_EQ(d.create_rc(), 0);
  int fd = kloop_ring_fd(d);
  ASSERT_GE(fd, 0);
  EXPECT_TRUE(FdOpen(fd));
  // Nested in another poller: readable once a completion is waiting.
  ASSERT_EQ(kloop_submit_timeout(d, 1, 20 * kMs), 0);
  EXPECT_EQ(d.Poll(0), 0);  // submits, nothing ready yet
  pollfd pf{fd, POLLIN, 0};
  EXPECT_EQ(::poll(&pf, 1, 2000), 1) << "ring fd not readable with a completion waiting";
  EXPECT_EQ(d.WaitFinal(1).result, 0);
}

TEST(Lifecycle, BufferArenaAndArgs) {
  Driver d(nullptr);
  ASSERT_EQ(d.create_rc(), 0);
  uint64_t base = 0, size = 0;
  ASSERT_EQ(kloop_buffer_arena(d, &base, &size), 0);
  EXPECT_NE(base, 0u);
  EXPECT_GE(size, 65536ull * 256ull);
  EXPECT_EQ(kloop_buffer_arena(d, nullptr, &size), -EINVAL);
  EXPECT_EQ(kloop_buffer_arena(d, &base, nullptr), -EINVAL);
}

TEST(Lifecycle, StatsCountPollsAndCompletions) {
  Driver d(nullptr);
  ASSERT_EQ(d.create_rc(), 0);
  kloop_stats a = GetStats(d);
  for (uint64_t t = 0; t < 5; ++t) ASSERT_EQ(kloop_submit_nop(d, t), 0);
  ASSERT_TRUE(d.RunUntil([&] { return d.events().size() == 5; }));
  kloop_stats b = GetStats(d);
  EXPECT_GT(b.polls, a.polls);
  EXPECT_EQ(b.completions - a.completions, 5u);
  EXPECT_GE(b.sqes - a.sqes, 5u);
  EXPECT_GE(b.cqes - a.cqes, 5u);
  EXPECT_EQ(b.ops_in_flight, 0u);
  EXPECT_EQ(b.streams, 0u);
  EXPECT_EQ(kloop_get_stats(d, nullptr), -EINVAL);
  kloop_stats small{};
  small.size = 4;
  EXPECT_EQ(kloop_get_stats(d, &small), -EINVAL);
}

// Versioned structs: a caller built against an older header passes a
// smaller `size`; the engine must not write beyond it. Found by fuzz_abi.
template <typename T>
void CheckWritesAtMostSize(const char *what, size_t size, int (*fill)(kloop_t *, T *),
                           kloop_t *loop) {
  std::vector<unsigned char> mem(sizeof(T) + 64, 0xEE);
  uint32_t s32 = static_cast<uint32_t>(size);
  std::memcpy(mem.data(), &s32, sizeof s32);
  int rc = fill(loop, reinterpret_cast<T *>(mem.data()));
  if (rc != 0) {
    EXPECT_EQ(rc, -EINVAL) << what << " size " << size;
    return;
  }
  for (size_t i = size; i < mem.size(); ++i)
    if (mem[i] != 0xEE) {
      ADD_FAILURE() << what << " with size " << size << " wrote byte " << i;
      return;
    }
}

TEST(Lifecycle, SmallerVersionedStructsAreNotOverwritten) {
  Driver d(nullptr);
  ASSERT_EQ(d.create_rc(), 0);
  for (size_t size : {offsetof(kloop_stats, reserved), sizeof(kloop_stats) - 8})
    CheckWritesAtMostSize<kloop_stats>("kloop_get_stats", size, kloop_get_stats, d);
  for (size_t size : {offsetof(kloop_caps, reserved), sizeof(kloop_caps) - 8})
    CheckWritesAtMostSize<kloop_caps>("kloop_get_caps", size, kloop_get_caps, d);
  auto probe = [](kloop_t *, kloop_caps *c) { return kloop_probe(c); };
  for (size_t size : {offsetof(kloop_caps, reserved), sizeof(kloop_caps) - 8})
    CheckWritesAtMostSize<kloop_caps>("kloop_probe", size, +probe, d);
}

TEST(Lifecycle, Strerror) {
  EXPECT_STREQ(kloop_strerror(-EINVAL), std::strerror(EINVAL));
  EXPECT_STREQ(kloop_strerror(-ECONNRESET), std::strerror(ECONNRESET));
  EXPECT_NE(kloop_strerror(0), nullptr);
  EXPECT_NE(kloop_strerror(INT32_MIN), nullptr);
  EXPECT_NE(kloop_strerror(INT32_MAX), nullptr);
  EXPECT_NE(kloop_strerror(-100000), nullptr);
}

}  // namespace
