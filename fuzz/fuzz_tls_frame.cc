// Fuzz target: the kernel-TLS receive helpers of the engine, as units.
//
//  (a) kl::RecordQueue, which frames the non-data records the kernel hands
//      over (alerts, handshake messages) for OpenSSL's record reader. A model
//      kept here says what every read must give back: the records in push
//      order, each as header(type, 3, 3, len) + payload, a read copying
//      min(n, bytes left of the first record) and never crossing into the
//      next record; push refuses a payload above 2^14 + 1 bytes (a TLS 1.3
//      inner plaintext: content and type; and a NULL payload with a
//      length) and changes nothing then; an empty queue
//      reads 0.
//  (b) kl::record_type_of() on a msghdr whose control buffer comes from the
//      input: well-formed SOL_TLS/TLS_GET_RECORD_TYPE messages, messages of
//      other levels and types, and malformed ones (lengths too short, too
//      long, huge), with msg_controllen cut anywhere. The buffer is a heap
//      block of exactly msg_controllen bytes, so a read beyond what the
//      kernel would have filled is caught by ASan. Where the control data is
//      well-formed the result must be the type of the last record-type
//      message (23, application data, when there is none).
//
// Input: byte 0 selects the part (bit 0: a, else b); the rest is decoded by
// the part (see RunQueue and RunCmsg).
#include <linux/tls.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <vector>

#include "harness.h"
#include "tls.h"

using kfuzz::Fail;
using kfuzz::Reader;

namespace {

// 2^14, the largest TLS plaintext record, and TLS 1.3's content type
constexpr uint32_t kMaxPlain = 16384 + 1;

// ---------------------------------------------------------------------------
// (a) RecordQueue against a model

// Lengths around the boundaries, chosen by a selector byte with the high bit.
constexpr uint32_t kPushLens[] = {0,          1,          4,          5,      255,         256,
                                  16383,      16384,      16385,      16386,  65535,       65536,
                                  0x7fffffff, 0x80000000, UINT32_MAX, 100000, 16384 + 2048};
constexpr size_t kReadLens[] = {0, 1, 2, 3, 4, 5, 6, 7, 16384, 16388, 16389, 16390, 65536};

// The model: the bytes of each record not read yet, in order.
struct Model {
  std::deque<std::vector<uint8_t>> records;
  size_t bytes = 0;
};

uint32_t PushLen(Reader &in) {
  uint8_t sel = in.u8();
  if (sel & 0x80) return kPushLens[sel % (sizeof kPushLens / sizeof kPushLens[0])];
  if (sel & 0x40) return in.u16() % (kMaxPlain + 64);
  return sel & 0x3f;
}

size_t ReadLen(Reader &in) {
  uint8_t sel = in.u8();
  if (sel & 0x80) return kReadLens[sel % (sizeof kReadLens / sizeof kReadLens[0])];
  if (sel & 0x40) return in.u16();
  return sel & 0x3f;
}

// One read of `n` bytes into a heap block of exactly n bytes, checked.
void CheckedRead(kl::RecordQueue &q, Model &m, size_t n) {
  std::unique_ptr<char[]> out(new char[n ? n : 1]);
  size_t got = q.read(n ? out.get() : nullptr, n);
  if (m.records.empty() || n == 0) {
    if (got != 0)
      Fail("read(%zu) gave %zu bytes (queue holds %zu records)", n, got, m.records.size());
    return;
  }
  std::vector<uint8_t> &front = m.records.front();
  size_t want = n < front.size() ? n : front.size();
  if (got != want)
    Fail("read(%zu) gave %zu bytes, the first record has %zu left", n, got, front.size());
  if (std::memcmp(out.get(), front.data(), got) != 0)
    Fail("read(%zu) gave other bytes than the first record's next %zu", n, got);
  front.erase(front.begin(), front.begin() + static_cast<ptrdiff_t>(got));
  m.bytes -= got;
  if (front.empty()) m.records.pop_front();
}

void RunQueue(Reader &in) {
  kl::RecordQueue q;
  Model m;
  for (int step = 0; step < 512 && !in.empty(); ++step) {
    uint8_t op = in.u8();
    switch (op % 5) {
      case 0:
      case 1: {  // push
        uint8_t type = in.u8();
        uint32_t len = PushLen(in);
        uint8_t seed = in.u8();
        bool null_payload = (op & 0x80) != 0;
        // Keep memory bounded: a record that would push the model beyond
        // 1 MiB is not pushed (the queue's growth is tested well below it).
        if (len <= kMaxPlain && m.bytes + len + 5 > (1u << 20)) break;
        // The payload is a heap block of exactly `len` bytes, except for
        // lengths far above 2^14: push must refuse those before reading, so
        // the shorter block catches a read.
        size_t have = len <= kMaxPlain + 64 ? len : kMaxPlain + 64;
        std::vector<uint8_t> payload(have);
        for (size_t i = 0; i < have; ++i) payload[i] = static_cast<uint8_t>(seed + i * 31);
        const void *p = null_payload ? nullptr : (have ? payload.data() : nullptr);
        bool ok = q.push(type, p, len);
        bool valid = len <= kMaxPlain && (len == 0 || p != nullptr);
        if (ok != valid)
          Fail("push(type %u, %s, %u) returned %d", type, p ? "payload" : "NULL", len, ok);
        if (!ok) break;
        std::vector<uint8_t> rec(5 + len);
        rec[0] = type;
        rec[1] = 3;
        rec[2] = 3;
        rec[3] = static_cast<uint8_t>(len >> 8);
        rec[4] = static_cast<uint8_t>(len & 0xff);
        if (len) std::memcpy(rec.data() + 5, payload.data(), len);
        m.bytes += rec.size();
        m.records.push_back(std::move(rec));
        break;
      }
      case 2:
      case 3:  // read
        CheckedRead(q, m, ReadLen(in));
        break;
      default:
        if (op & 0x80) {
          q.clear();
          m.records.clear();
          m.bytes = 0;
        } else {
          // Drain the first record one byte at a time.
          size_t left = m.records.empty() ? 1 : m.records.front().size();
          for (size_t i = 0; i < left; ++i) CheckedRead(q, m, 1);
        }
        break;
    }
    if (q.empty() != m.records.empty())
      Fail("empty() is %d with %zu records in the model", q.empty(), m.records.size());
  }
  // Everything pushed comes back, then the queue is empty.
  while (!m.records.empty()) CheckedRead(q, m, 4096);
  CheckedRead(q, m, 16389);
  if (!q.empty()) Fail("queue not empty after everything was read");
}

// ---------------------------------------------------------------------------
// (b) record_type_of on fuzzed control data

constexpr uint64_t kRawLens[] = {0,
                                 1,
                                 sizeof(cmsghdr) - 1,
                                 sizeof(cmsghdr),
                                 CMSG_LEN(1),
                                 CMSG_LEN(1) + 1,
                                 CMSG_LEN(8),
                                 CMSG_LEN(9),
                                 CMSG_SPACE(1),
                                 64,
                                 0x7fffffff,
                                 0x80000000,
                                 UINT32_MAX,
                                 UINT64_MAX / 2,
                                 UINT64_MAX - 7,
                                 UINT64_MAX};

constexpr int kLevels[] = {SOL_TLS, SOL_SOCKET, SOL_IP, IPPROTO_TCP, -1, 0};
constexpr int kTypes[] = {TLS_GET_RECORD_TYPE, TLS_SET_RECORD_TYPE, 0, 3, -1};

void Put(std::vector<uint8_t> &buf, size_t at, const void *p, size_t n) {
  if (buf.size() < at + n) buf.resize(at + n);
  std::memcpy(buf.data() + at, p, n);
}

void RunCmsg(Reader &in) {
  std::vector<uint8_t> buf;
  // Record-type of each well-formed message, in order, and where each ends
  // (with padding), to compute the model for any cut at a boundary.
  struct Msg {
    size_t end;
    int type;  // -1: not a record-type message
  };
  std::vector<Msg> msgs;
  uint8_t count = in.u8() % 6;
  for (uint8_t i = 0; i < count; ++i) {
    uint8_t kind = in.u8();
    size_t at = buf.size();
    cmsghdr h{};
    if ((kind & 3) == 0) {
      // A well-formed record-type message, as the kernel writes it.
      uint8_t type = in.u8();
      h.cmsg_len = CMSG_LEN(1);
      h.cmsg_level = SOL_TLS;
      h.cmsg_type = TLS_GET_RECORD_TYPE;
      Put(buf, at, &h, sizeof h);
      Put(buf, at + CMSG_LEN(0), &type, 1);
      buf.resize(at + CMSG_SPACE(1));
      msgs.push_back({buf.size(), type});
    } else if ((kind & 3) == 1) {
      // A well-formed message of some other level/type with 1..64 bytes.
      size_t dlen = 1 + in.u8() % 64;
      h.cmsg_len = CMSG_LEN(dlen);
      h.cmsg_level = kLevels[1 + in.u8() % 5];
      h.cmsg_type = kTypes[in.u8() % 5];
      if (h.cmsg_level == SOL_TLS && h.cmsg_type == TLS_GET_RECORD_TYPE) h.cmsg_level = SOL_IP;
      Put(buf, at, &h, sizeof h);
      for (size_t k = 0; k < dlen; ++k) buf.push_back(in.u8());
      buf.resize(at + CMSG_SPACE(dlen));
      msgs.push_back({buf.size(), -1});
    } else {
      // A malformed one: any length field, any level and type, some data.
      uint8_t sel = in.u8();
      h.cmsg_len = (sel & 0x80) ? kRawLens[sel % (sizeof kRawLens / sizeof kRawLens[0])]
                                : static_cast<size_t>(sel);
      h.cmsg_level = (kind & 4) ? SOL_TLS : kLevels[in.u8() % 6];
      h.cmsg_type = (kind & 8) ? TLS_GET_RECORD_TYPE : kTypes[in.u8() % 5];
      Put(buf, at, &h, sizeof h);
      size_t dlen = in.u8() % 40;
      for (size_t k = 0; k < dlen; ++k) buf.push_back(in.u8());
      buf.resize(CMSG_ALIGN(buf.size()));
      msgs.push_back({buf.size(), -2});
    }
  }
  // msg_controllen: everything, cut at a message boundary, or cut anywhere
  // (also inside a header); never more than the buffer holds.
  uint8_t cut = in.u8();
  size_t controllen = buf.size();
  bool cut_at_boundary = true;
  switch (cut & 3) {
    case 0:
      break;
    case 1:
      if (!msgs.empty()) controllen = msgs[(cut >> 2) % msgs.size()].end;
      break;
    case 2:
      controllen = buf.empty() ? 0 : (cut >> 2) % (buf.size() + 1);
      cut_at_boundary = false;
      break;
    default:
      controllen = controllen >= (cut >> 2) ? controllen - (cut >> 2) : 0;
      cut_at_boundary = false;
      break;
  }
  // The control buffer is exactly controllen bytes (a valid pointer even for
  // 0 bytes unless the input asks for NULL).
  std::unique_ptr<uint8_t[]> control(new uint8_t[controllen ? controllen : 1]);
  if (controllen) std::memcpy(control.get(), buf.data(), controllen);
  uint8_t iobyte = 0;
  iovec iov{&iobyte, 1};
  msghdr m{};
  m.msg_iov = &iov;
  m.msg_iovlen = 1;
  m.msg_control = (controllen == 0 && (cut & 4)) ? nullptr : control.get();
  m.msg_controllen = controllen;
  uint8_t got = kl::record_type_of(&m);

  // The model, for control data the kernel could have produced.
  if (!cut_at_boundary) {
    bool on_boundary = controllen == 0;
    for (const Msg &x : msgs)
      if (x.end == controllen) on_boundary = true;
    if (!on_boundary) return;
  }
  int want = 23;
  for (const Msg &x : msgs) {
    if (x.end > controllen) break;
    if (x.type == -2) return;  // a malformed message within the used part
    if (x.type >= 0) want = x.type;
  }
  if (got != want)
    Fail("record_type_of gave %u, the control data (%zu bytes) says %d", got, controllen, want);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  Reader in(data, size);
  if (in.u8() & 1)
    RunQueue(in);
  else
    RunCmsg(in);
  // record_type_of without control data at all.
  if (kl::record_type_of(nullptr) != 23) Fail("record_type_of(NULL) is not 23");
  return 0;
}
