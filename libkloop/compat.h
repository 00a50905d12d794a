// Kernel io_uring features newer than Debian 12's liburing 2.3 headers.
// Each definition mirrors the kernel UAPI value; the SQE is filled by hand.
#pragma once

#include <errno.h>
#include <liburing.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

namespace kl::compat {

// Opcodes after IORING_OP_SENDMSG_ZC (47) in the kernel's enum io_uring_op.
inline constexpr unsigned kOpReadMultishot = 49;  // 6.7
inline constexpr unsigned kOpWaitid = 50;         // 6.7
inline constexpr unsigned kOpBind = 56;           // 6.11
inline constexpr unsigned kOpListen = 57;         // 6.11

inline constexpr unsigned kFeatRecvsendBundle = 1u << 14;  // IORING_FEAT_RECVSEND_BUNDLE, 6.10
inline constexpr unsigned kPbufRingInc = 2;                // IOU_PBUF_RING_INC, 6.12

// IORING_OP_WAITID: fd = id, len = idtype, file_index = options,
// addr2 = siginfo_t *, waitid_flags (the rw_flags slot) = 0.
inline void prep_waitid(io_uring_sqe *sqe, idtype_t idtype, id_t id, siginfo_t *info, int options) {
  io_uring_prep_rw(IORING_OP_NOP, sqe, static_cast<int>(id), nullptr, static_cast<unsigned>(idtype),
                   0);
  sqe->opcode = kOpWaitid;
  sqe->rw_flags = 0;
  sqe->file_index = static_cast<__u32>(options);
  sqe->addr2 = reinterpret_cast<__u64>(info);
}

// liburing 2.3 declares io_uring_enable_rings() but its library does not
// export it; IORING_REGISTER_ENABLE_RINGS is a plain register call (5.10).
inline int enable_rings(int ring_fd) {
  long r = syscall(__NR_io_uring_register, ring_fd, IORING_REGISTER_ENABLE_RINGS, nullptr, 0);
  return r < 0 ? -errno : 0;
}

inline int pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
  long r = syscall(SYS_pidfd_open, pid, 0);
#else
  long r = syscall(434, pid, 0);
#endif
  return r < 0 ? -1 : static_cast<int>(r);
}

// Turn a siginfo_t filled by waitid(2) into the status word waitpid(2) gives.
inline int wait_status(const siginfo_t &si) {
  switch (si.si_code) {
    case CLD_EXITED:
      return (si.si_status & 0xff) << 8;
    case CLD_KILLED:
      return si.si_status & 0x7f;
    case CLD_DUMPED:
      return (si.si_status & 0x7f) | 0x80;
    default:
      return 0;
  }
}

}  // namespace kl::compat
