/*
 * kloop.h — the stable C ABI of libkloop, an io_uring event engine.
 *
 * Conventions (read these first):
 *
 *  1. Handles are opaque. A `kloop_t` is created by kloop_create() and ended
 *     by kloop_destroy(). A loop belongs to one thread; of all functions only
 *     kloop_wake() may be called from another thread.
 *  2. Every fallible call returns a value >= 0 on success or a negative errno
 *     (-EINVAL, -EBADF, ...) on failure. Nothing aborts, throws or prints.
 *     A NULL or destroyed handle gives -EBADF.
 *  3. Every operation carries a caller-chosen 64-bit token. Tokens of live
 *     operations and streams must be distinct (a duplicate gives -EEXIST);
 *     a token may be reused once its final completion has been returned.
 *     A submit call that returns < 0 never produces a completion. One that
 *     returns 0 produces exactly one final completion; multishot operations
 *     and streams produce earlier ones that carry KLOOP_COMPLETION_MORE.
 *     Cancellation, close and kloop_destroy() keep this promise (destroy
 *     drops the completions it reaps itself).
 *  4. Memory the kernel reads or writes stays valid until the final
 *     completion of its operation. For kloop_submit_recv/send/read/write the
 *     caller's buffer is pinned by the caller; everything else (addresses,
 *     msghdr, stream queues, receive buffers) is owned by the engine.
 *  5. Data the engine hands out (KLOOP_EVENT_DATA, accepted and received
 *     addresses) stays valid until the next kloop_poll() on the same loop.
 *  6. kloop_poll() is the only call that enters the kernel in the normal
 *     case: it submits what is queued, waits, and fills completion records.
 *     The exception: a stream write of 16 KiB or more to an idle socket
 *     stream is sent at once (kloop_stream_write).
 *  7. Public structs have only fixed-width fields. Those that may grow start
 *     with a `size` field that the caller sets to sizeof(the struct).
 *  8. A loop used in a child after fork() answers -EBADFD to every call but
 *     kloop_destroy(), which then frees user-space memory only.
 */
#ifndef KLOOP_H
#define KLOOP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KLOOP_API __attribute__((visibility("default")))
#else
#define KLOOP_API
#endif

/* Version of this header. The major version is the soname (libkloop.so.N). */
#define KLOOP_VERSION_MAJOR 0
#define KLOOP_VERSION_MINOR 1
#define KLOOP_VERSION_PATCH 0
#define KLOOP_VERSION \
  ((KLOOP_VERSION_MAJOR << 16) | (KLOOP_VERSION_MINOR << 8) | KLOOP_VERSION_PATCH)

typedef struct kloop kloop_t;

/*
 * kloop_version - version of the library that is loaded.
 * Returns: (major << 16) | (minor << 8) | patch; compare with KLOOP_VERSION.
 * Thread safety: any thread. Since: 0.1
 */
KLOOP_API uint32_t kloop_version(void);

/* ---------------------------------------------------------------------- */
/* Capabilities                                                            */
/* ---------------------------------------------------------------------- */

#define KLOOP_CAP_SINGLE_ISSUER (UINT64_C(1) << 0)    /* IORING_SETUP_SINGLE_ISSUER (6.0) */
#define KLOOP_CAP_DEFER_TASKRUN (UINT64_C(1) << 1)    /* IORING_SETUP_DEFER_TASKRUN (6.1) */
#define KLOOP_CAP_MULTISHOT_ACCEPT (UINT64_C(1) << 2) /* 5.19 */
#define KLOOP_CAP_MULTISHOT_RECV (UINT64_C(1) << 3)   /* 6.0 */
#define KLOOP_CAP_MULTISHOT_POLL (UINT64_C(1) << 4)   /* 5.13 */
#define KLOOP_CAP_BUF_RING (UINT64_C(1) << 5)         /* provided-buffer ring, 5.19 */
#define KLOOP_CAP_RECV_BUNDLE (UINT64_C(1) << 6)      /* IORING_RECVSEND_BUNDLE, 6.10 */
#define KLOOP_CAP_BUF_RING_INC (UINT64_C(1) << 7)     /* IOU_PBUF_RING_INC, 6.12 */
#define KLOOP_CAP_WAITID (UINT64_C(1) << 8)           /* IORING_OP_WAITID, 6.7 */
#define KLOOP_CAP_SEND_ZC (UINT64_C(1) << 9)          /* IORING_OP_SEND_ZC, 6.0 */
#define KLOOP_CAP_EXT_ARG (UINT64_C(1) << 10)     /* IORING_FEAT_EXT_ARG: timed wait in one call */
#define KLOOP_CAP_NODROP (UINT64_C(1) << 11)      /* IORING_FEAT_NODROP */
#define KLOOP_CAP_REG_RING_FD (UINT64_C(1) << 12) /* registered ring fd, 5.18 */
#define KLOOP_CAP_SOCKET_OP (UINT64_C(1) << 13)   /* IORING_OP_SOCKET, 5.19 */
#define KLOOP_CAP_SPLICE (UINT64_C(1) << 14)      /* IORING_OP_SPLICE, 5.7 */
#define KLOOP_CAP_BIND_LISTEN (UINT64_C(1) << 15) /* IORING_OP_BIND/LISTEN, 6.11 */
#define KLOOP_CAP_PIDFD (UINT64_C(1) << 16)       /* pidfd_open(2) */
#define KLOOP_CAP_KTLS (UINT64_C(1) << 17)        /* kernel TLS: TCP ULP "tls" (4.13) */

/*
 * struct kloop_caps - what the kernel offers and what a loop uses.
 *   size:      set by the caller to sizeof(struct kloop_caps).
 *   kernel:    KLOOP_CAP_* bits the running kernel supports.
 *   enabled:   KLOOP_CAP_* bits the loop uses: kernel minus config.disable,
 *              minus what depends on an absent bit (DEFER_TASKRUN and
 *              REG_RING_FD need SINGLE_ISSUER; MULTISHOT_RECV, RECV_BUNDLE
 *              and BUF_RING_INC need BUF_RING; KLOOP_CONFIG_NO_DEFER_TASKRUN
 *              clears SINGLE_ISSUER and DEFER_TASKRUN; KLOOP_CONFIG_SQPOLL
 *              clears DEFER_TASKRUN). Equal to `kernel` for kloop_probe().
 *   features:  IORING_FEAT_* bits reported by io_uring_setup(2).
 *   sq_entries, cq_entries: ring sizes (0 for kloop_probe()).
 *   opcodes:   opcodes[i] is 1 when IORING_OP number i is supported.
 */
struct kloop_caps {
  uint32_t size;
  uint32_t features;
  uint64_t kernel;
  uint64_t enabled;
  uint32_t sq_entries;
  uint32_t cq_entries;
  uint32_t buf_size;
  uint32_t buf_count;
  uint8_t opcodes[256];
  uint64_t reserved[8];
};

/*
 * kloop_probe - ask the running kernel what io_uring offers.
 * Returns: 0, or -ENOSYS (no io_uring), -EPERM (seccomp, or
 *   kernel.io_uring_disabled), -ENOMEM, -EINVAL (caps NULL or size too small).
 * Thread safety: any thread. Since: 0.1
 */
KLOOP_API int kloop_probe(struct kloop_caps *caps);

/* ---------------------------------------------------------------------- */
/* Loop lifecycle                                                          */
/* ---------------------------------------------------------------------- */

/* kloop_config.flags */
#define KLOOP_CONFIG_SQPOLL (1u << 0)           /* kernel submission thread (costs a core) */
#define KLOOP_CONFIG_NO_DEFER_TASKRUN (1u << 1) /* allow use from several threads in turn */
#define KLOOP_CONFIG_NO_SEND_GATHER (1u << 2)   /* one queued block per stream send */
#define KLOOP_CONFIG_NO_DIRECT_SEND (1u << 3)   /* large writes always wait for the poll */
#define KLOOP_CONFIG_NO_TLS_SEAL (1u << 4)      /* OpenSSL does every TLS record */
#define KLOOP_CONFIG_NO_TLS_SEND_AFTER_WAIT (1u << 5) /* after a wait too, TLS sends wait for the poll */

/*
 * struct kloop_config - how to build a loop. Fill with kloop_config_init().
 *   size:        sizeof(struct kloop_config).
 *   sq_entries:  submission queue depth (default 256, 1..32768).
 *   cq_entries:  completion queue size (default 1024; 0 means 4 x sq_entries;
 *                sq_entries..65536).
 *   flags:       KLOOP_CONFIG_*.
 *   disable:     KLOOP_CAP_* bits to treat as absent even if the kernel has
 *                them: this forces the fallback paths (feature ladder).
 *   buf_size:    size of one receive buffer (default 65536, 256..1 MiB).
 *   buf_count:   receive buffers per loop (default 256, power of two 1..32768).
 *   sqpoll_idle_ms: SQPOLL idle time (default 1000).
 */
struct kloop_config {
  uint32_t size;
  uint32_t sq_entries;
  uint32_t cq_entries;
  uint32_t flags;
  uint64_t disable;
  uint32_t buf_size;
  uint32_t buf_count;
  uint32_t sqpoll_idle_ms;
  uint32_t reserved0;
  uint64_t reserved[6];
};

/*
 * kloop_config_init - fill *cfg with the defaults (and cfg->size).
 * Returns: 0, or -EINVAL when cfg is NULL. Since: 0.1
 */
KLOOP_API int kloop_config_init(struct kloop_config *cfg);

/*
 * kloop_create - make a loop.
 *   cfg:  NULL for defaults, or a config whose size is at least the 0.1 size.
 *   out:  receives the handle.
 * Returns: 0; -EINVAL (bad config, out NULL); -ENOSYS, -EPERM (io_uring not
 *   available: seccomp, kernel.io_uring_disabled); -ENOMEM (including
 *   RLIMIT_MEMLOCK on old kernels); any errno of io_uring_setup(2).
 *   On failure nothing is left allocated and *out is untouched.
 * Thread safety: any thread; the loop belongs to the thread that polls it.
 * Since: 0.1
 */
KLOOP_API int kloop_create(const struct kloop_config *cfg, kloop_t **out);

/*
 * kloop_destroy - cancel every operation and stream, wait until the kernel
 *   has let go of all memory it was given, close stream fds the engine owns,
 *   free the loop. Completions produced meanwhile are dropped.
 * Returns: 0, or -EBADF for a NULL or already destroyed handle.
 * Since: 0.1
 */
KLOOP_API int kloop_destroy(kloop_t *loop);

/*
 * kloop_get_caps - what this loop uses (caps->enabled) and what the kernel
 *   offers. Returns: 0, -EBADF, -EINVAL (caps NULL or size too small).
 * Since: 0.1
 */
KLOOP_API int kloop_get_caps(kloop_t *loop, struct kloop_caps *caps);

/*
 * kloop_ring_fd - the io_uring fd (for diagnostics, or to nest the loop in
 *   another poller: it is readable when completions are waiting).
 * Returns: fd >= 0, -EBADF. Since: 0.1
 */
KLOOP_API int kloop_ring_fd(kloop_t *loop);

/* ---------------------------------------------------------------------- */
/* Completions                                                             */
/* ---------------------------------------------------------------------- */

/* kloop_completion.flags */
#define KLOOP_COMPLETION_MORE (1u << 0) /* not the final completion of this token */
/*
 * On a KLOOP_EVENT_DATA record: the next record in the same kloop_poll()
 * array is KLOOP_EVENT_DATA of the same stream, so a binding can hand both
 * to its reader as one piece. Never set on an array's last record. Since: 0.1
 */
#define KLOOP_COMPLETION_DATA_NEXT (1u << 1)

/* kloop_completion.event */
#define KLOOP_EVENT_OP 0u         /* a one-shot or multishot operation */
#define KLOOP_EVENT_DATA 1u       /* stream: `result` bytes at `data` */
#define KLOOP_EVENT_EOF 2u        /* stream: peer finished sending (result 0) */
#define KLOOP_EVENT_ERROR 3u      /* stream: I/O failed, result is -errno */
#define KLOOP_EVENT_WRITE_LOW 4u  /* stream: write queue drained to <= low water */
#define KLOOP_EVENT_CLOSED 5u     /* stream: final completion; result 0 or -errno */
#define KLOOP_EVENT_WRITE_DONE 6u /* stream: write_eof shutdown done (result 0/-errno) */
#define KLOOP_EVENT_HANDSHAKE 7u  /* TLS stream: handshake over; result 0 or -errno */
#define KLOOP_EVENT_WRITE_RELEASE                           \
  8u /* stream: bytes of kloop_stream_write_ref() no longer \
        read; `data` is its ref */

/* kloop_completion.aux of KLOOP_EVENT_ERROR: which side of the stream failed */
#define KLOOP_ERROR_READ 1u  /* receiving failed; reading stops */
#define KLOOP_ERROR_WRITE 2u /* sending failed; the write queue is dropped */
#define KLOOP_ERROR_TLS                                     \
  4u /* with READ or WRITE: TLS failed (alert, bad record); \
        kloop_stream_tls_error() says how */

/* kloop_completion.aux of KLOOP_EVENT_HANDSHAKE (result 0): what kernel TLS took over */
#define KLOOP_HANDSHAKE_KTLS_TX 1u /* the kernel encrypts what the stream sends */
#define KLOOP_HANDSHAKE_KTLS_RX 2u /* the kernel decrypts what the stream receives */

/* kloop_completion.aux of KLOOP_EVENT_EOF on a TLS stream */
#define KLOOP_EOF_UNCLEAN 1u /* the connection ended without the peer's close_notify */

/*
 * struct kloop_completion - one record filled by kloop_poll(). 32 bytes.
 *   token:  the token given at submit/attach.
 *   result: operation result (bytes, fd, status) >= 0, or -errno.
 *   flags:  KLOOP_COMPLETION_*.
 *   data:   address of bytes or of a socket address the engine hands out
 *           (valid until the next kloop_poll()), else 0.
 *   event:  KLOOP_EVENT_*.
 *   aux:    event-specific, given with each operation below (poll revents,
 *           address length of accept and recvmsg, ...); else 0.
 */
struct kloop_completion {
  uint64_t token;
  int32_t result;
  uint32_t flags;
  uint64_t data;
  uint32_t event;
  uint32_t aux;
};

/*
 * kloop_poll - submit queued work, wait, collect completions.
 *   out, max:   caller-owned array of `max` records (max >= 1).
 *   timeout_ns: < 0 wait until at least one completion; 0 do not wait;
 *               > 0 wait at most that long.
 * Receive buffers handed out by the previous kloop_poll() are recycled at
 * the start of this call. Completions that do not fit stay for the next call.
 * While it waits, the engine gives the pages of receive buffers it has not
 * used for a while back to the kernel (kloop_stats.buffers_released).
 * Returns: number of records filled (0 on timeout), -EINTR when a signal
 *   arrived while waiting (records may still be pending: poll again),
 *   -EBADF, -EINVAL (out NULL or max 0), -EBADFD (after fork), or another
 *   -errno of io_uring_enter(2).
 * Since: 0.1
 */
KLOOP_API int kloop_poll(kloop_t *loop, struct kloop_completion *out, uint32_t max,
                         int64_t timeout_ns);

/*
 * kloop_buffer_arena - the one address range that holds every receive
 *   buffer of this loop: the `data` of every KLOOP_EVENT_DATA record lies
 *   inside [*base, *base + *size). A binding can map it once and slice it.
 * Returns: 0, -EBADF, -EINVAL (base or size NULL). Since: 0.1
 */
KLOOP_API int kloop_buffer_arena(kloop_t *loop, uint64_t *base, uint64_t *size);

/*
 * kloop_wake - make a kloop_poll() that waits (or the next one) return.
 * Returns: 0, -EBADF, -EBADFD (after fork). Thread safety: any thread,
 *   async-signal-safe.
 * Since: 0.1
 */
KLOOP_API int kloop_wake(kloop_t *loop);

/* ---------------------------------------------------------------------- */
/* One-shot and multishot operations                                       */
/* ---------------------------------------------------------------------- */

/* `flags` of submit calls */
#define KLOOP_OP_MULTISHOT (1u << 0) /* accept, poll: keep going until cancelled */
#define KLOOP_POLL_EDGE                                             \
  (1u << 1) /* poll with KLOOP_OP_MULTISHOT: kernel multishot poll, \
               reports each new readiness (edge-like) */
#define KLOOP_ACCEPT_KERNEL_MULTISHOT                  \
  (1u << 2) /* accept with KLOOP_OP_MULTISHOT: use the \
      kernel's multishot accept (see kloop_submit_accept) */

/* Common errors of every kloop_submit_*: -EBADF (handle), -EBADFD (after
 * fork), -EEXIST (token in use), -EINVAL (bad argument, e.g. negative fd,
 * NULL buffer with a length, unknown flag), -ENOMEM. Errors of the operation
 * itself arrive in the completion's result. */

/* kloop_submit_nop - completes with result 0. Since: 0.1 */
KLOOP_API int kloop_submit_nop(kloop_t *loop, uint64_t token);

/*
 * kloop_submit_accept - accept4(2) a connection on listening socket fd.
 *   flags: KLOOP_OP_MULTISHOT to keep accepting until cancelled or until the
 *   first error. By default the engine re-arms a one-shot accept after each
 *   connection: the kernel wakes waiters of a listening socket one at a
 *   time, and a kernel multishot accept stays first in line, so processes
 *   sharing the socket (pre-fork servers) would never get a connection.
 *   KLOOP_OP_MULTISHOT | KLOOP_ACCEPT_KERNEL_MULTISHOT uses the kernel's
 *   multishot accept (one SQE for all connections) where it exists: for a
 *   socket no other process accepts on. New fds are SOCK_CLOEXEC|SOCK_NONBLOCK.
 * Completion: result = new fd or -errno; for one-shot accept `data` points
 *   at the peer's sockaddr and `aux` is its length (multishot: data 0).
 * Since: 0.1
 */
KLOOP_API int kloop_submit_accept(kloop_t *loop, uint64_t token, int fd, uint32_t flags);

/*
 * kloop_submit_connect - connect(2) fd to addr (copied by the engine).
 *   addrlen: 1..128 (sizeof(struct sockaddr_storage)).
 * Completion: result 0 or -errno. Since: 0.1
 */
KLOOP_API int kloop_submit_connect(kloop_t *loop, uint64_t token, int fd, const void *addr,
                                   uint32_t addrlen);

/*
 * kloop_submit_recv / kloop_submit_send - recv(2)/send(2) with the caller's
 *   buffer (pinned by the caller until the completion). msg_flags are
 *   MSG_* flags passed to the kernel (MSG_NOSIGNAL is always added to send).
 *   len may be 0. Completion: bytes transferred or -errno. Since: 0.1
 */
KLOOP_API int kloop_submit_recv(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                                uint32_t msg_flags);
KLOOP_API int kloop_submit_send(kloop_t *loop, uint64_t token, int fd, const void *buf,
                                uint32_t len, uint32_t msg_flags);

/*
 * kloop_submit_recvmsg - receive one datagram into buf (caller-pinned) and
 *   its source address (engine-owned).
 * Completion: result = bytes or -errno; data = source sockaddr (valid until
 *   the next poll), aux = (msg_flags << 16) | address length.
 * Since: 0.1
 */
KLOOP_API int kloop_submit_recvmsg(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                                   uint32_t msg_flags);

/*
 * kloop_submit_sendmsg - send one datagram of len bytes from buf
 *   (caller-pinned) to addr (copied; NULL/0 for a connected socket).
 * Completion: bytes or -errno. Since: 0.1
 */
KLOOP_API int kloop_submit_sendmsg(kloop_t *loop, uint64_t token, int fd, const void *buf,
                                   uint32_t len, const void *addr, uint32_t addrlen,
                                   uint32_t msg_flags);

/*
 * kloop_submit_read / kloop_submit_write - read(2)/write(2) (pipes, ttys,
 *   files) at offset (KLOOP_OFFSET_CURRENT for the file position).
 * Completion: bytes or -errno. Since: 0.1
 */
#define KLOOP_OFFSET_CURRENT UINT64_MAX
KLOOP_API int kloop_submit_read(kloop_t *loop, uint64_t token, int fd, void *buf, uint32_t len,
                                uint64_t offset);
KLOOP_API int kloop_submit_write(kloop_t *loop, uint64_t token, int fd, const void *buf,
                                 uint32_t len, uint64_t offset);

/*
 * kloop_submit_poll - wait for poll(2) events (POLLIN, POLLOUT, ...) on fd.
 *   events: 1..0xffff.
 *   flags: KLOOP_OP_MULTISHOT keeps reporting until cancelled, level-
 *   triggered: the poll is re-armed after each report, so an fd that stays
 *   ready is reported again at the next kloop_poll() (what add_reader needs).
 *   KLOOP_OP_MULTISHOT | KLOOP_POLL_EDGE uses the kernel's multishot poll
 *   (a report per wake-up; re-arm emulated on kernels without it).
 *   A multishot poll ends at its first error or at cancellation.
 * Completion: result = revents or -errno; aux = revents. Since: 0.1
 */
KLOOP_API int kloop_submit_poll(kloop_t *loop, uint64_t token, int fd, uint32_t events,
                                uint32_t flags);

/*
 * kloop_submit_timeout - complete after timeout_ns nanoseconds (relative,
 *   CLOCK_MONOTONIC). Completion: 0 when it expired, -ECANCELED when
 *   cancelled. Since: 0.1
 */
KLOOP_API int kloop_submit_timeout(kloop_t *loop, uint64_t token, uint64_t timeout_ns);

/*
 * kloop_submit_shutdown - shutdown(2) fd with how = SHUT_RD/WR/RDWR.
 * Completion: 0 or -errno. Since: 0.1
 */
KLOOP_API int kloop_submit_shutdown(kloop_t *loop, uint64_t token, int fd, int how);

/*
 * kloop_submit_close - close(2) fd. Operations of this loop still on fd are
 *   cancelled first, and fd is closed only after their completions.
 * Completion: 0 or -errno. Since: 0.1
 */
KLOOP_API int kloop_submit_close(kloop_t *loop, uint64_t token, int fd);

/*
 * kloop_submit_splice - splice(2) up to len bytes from fd_in to fd_out; one
 *   of them must be a pipe. Offsets: KLOOP_OFFSET_CURRENT for none.
 * Completion: bytes moved (0 at end of input) or -errno. Since: 0.1
 */
KLOOP_API int kloop_submit_splice(kloop_t *loop, uint64_t token, int fd_in, uint64_t off_in,
                                  int fd_out, uint64_t off_out, uint32_t len, uint32_t flags);

/*
 * kloop_submit_child_exit - wait for child process pid to exit and reap it.
 *   Uses IORING_OP_WAITID where available, else polls a pidfd and reaps
 *   with waitid(2).
 * Submit errors besides the common ones: -EINVAL (pid <= 0), -ENOSYS (the
 *   kernel has neither WAITID nor pidfd_open), and errors of pidfd_open(2)
 *   (-ESRCH: no such process) on the pidfd path.
 * Completion: result = wait status as waitpid(2) reports it (use
 *   WIFEXITED/WEXITSTATUS...) or -errno (-ECHILD: not our child).
 * Since: 0.1
 */
KLOOP_API int kloop_submit_child_exit(kloop_t *loop, uint64_t token, int pid);

/*
 * kloop_cancel - request cancellation of the live operation or stream read
 *   with this token. Its final completion follows (usually -ECANCELED; an
 *   operation that had already finished reports its real result, and data
 *   that arrived is still delivered).
 *   A token stays live until its final completion has been returned.
 * Returns: 0, -ENOENT (no live operation with this token), -EALREADY (a
 *   cancel is already in progress, the operation has finished and its
 *   completion is on the way, or the stream is closing), -EBADF. Since: 0.1
 */
KLOOP_API int kloop_cancel(kloop_t *loop, uint64_t token);

/*
 * kloop_cancel_now - kloop_cancel(), and hand the request to the kernel at
 *   once (one io_uring_enter(2)) instead of at the next kloop_poll(), so
 *   that the kernel has let go of the operation's fd when this returns: a
 *   listening socket closed right after kloop_cancel_now() of its accept
 *   stops listening at once (shutdown(2) would stop it for every process
 *   sharing it). The final completion still comes from a later kloop_poll().
 * Returns: as kloop_cancel(), or another -errno of io_uring_enter(2).
 * Thread safety: the owner thread. Since: 0.1
 */
KLOOP_API int kloop_cancel_now(kloop_t *loop, uint64_t token);

/*
 * kloop_cancel_fd - request cancellation of every live operation on fd
 *   (not streams: use kloop_stream_abort).
 * Returns: number of operations asked to cancel (>= 0), -EINVAL (fd < 0),
 *   -EBADF. Since: 0.1
 */
KLOOP_API int kloop_cancel_fd(kloop_t *loop, int fd);

/* ---------------------------------------------------------------------- */
/* Engine-owned streams                                                    */
/* ---------------------------------------------------------------------- */

/* kloop_stream_attach flags */
#define KLOOP_STREAM_SOCKET 0u      /* recv/sendmsg (default) */
#define KLOOP_STREAM_FILE (1u << 0) /* read/writev: pipes, ttys, character devices */
#define KLOOP_STREAM_CLOSE_FD                                                               \
  (1u << 1)                            /* engine closes fd at the end; else the caller does \
                                          after the CLOSED event */
#define KLOOP_STREAM_PAUSED (1u << 2)  /* do not start reading yet */
#define KLOOP_STREAM_NO_READ (1u << 3) /* write-only stream (never reads) */

/*
 * kloop_stream_attach - let the engine drive connected fd.
 * Every event of the stream carries `token`: DATA, EOF and ERROR (reading),
 * WRITE_LOW and WRITE_DONE (writing) carry KLOOP_COMPLETION_MORE; CLOSED is
 * the final completion and comes once, after kloop_stream_close() or
 * kloop_stream_abort() (or kloop_destroy()).
 * Reading: the engine receives into its buffers; DATA points at them until
 * the next poll. After EOF or ERROR it stops reading. A stream with
 * KLOOP_STREAM_PAUSED starts reading at kloop_stream_resume().
 * Returns: 0, -EINVAL (fd < 0, unknown flag), -EEXIST, -ENOMEM, -EBADF.
 * Since: 0.1
 */
KLOOP_API int kloop_stream_attach(kloop_t *loop, uint64_t token, int fd, uint32_t flags);

/*
 * kloop_stream_pause / kloop_stream_resume - stop or start delivering DATA.
 *   Bytes that the kernel already handed over while pausing are kept and
 *   delivered first after resume. Both are idempotent.
 * Returns: 0, -ENOENT (no such stream), -EPIPE (stream closing), -EBADF.
 * Since: 0.1
 */
KLOOP_API int kloop_stream_pause(kloop_t *loop, uint64_t token);
KLOOP_API int kloop_stream_resume(kloop_t *loop, uint64_t token);

/*
 * kloop_stream_write - copy len bytes into the stream's write queue. One send
 *   is in flight per stream; queued buffers are gathered into one sendmsg;
 *   short sends are resubmitted. No completion per write. A write of 16 KiB
 *   or more to a socket stream with nothing queued and no send in flight
 *   goes to the kernel at once (send(2), MSG_DONTWAIT) and only what the
 *   socket did not take is copied and queued; any error of that send
 *   leaves all of it queued, for the queued send to report
 *   (KLOOP_CONFIG_NO_DIRECT_SEND turns this off; kloop_stats.direct_sends
 *   counts it).
 * Returns: bytes now queued and not yet accepted by the kernel (>= 0, after
 *   this write), -ENOENT, -EPIPE (write side shut down, aborting, failed,
 *   or the stream has finished closing: the data is dropped), -EBADF, -EINVAL (buf NULL with len >
 * 0, or len over 1 TiB), -ENOMEM (the data is dropped). When the result rises above the high-water
 * mark the engine remembers it and sends WRITE_LOW once the queue falls to the low-water mark or
 * below. Since: 0.1
 */
KLOOP_API int64_t kloop_stream_write(kloop_t *loop, uint64_t token, const void *buf, size_t len);

/*
 * kloop_stream_write_ref - queue len bytes at buf without copying them (for
 *   large writes, where the copy of kloop_stream_write() costs more than a
 *   record). The caller keeps the bytes alive and unchanged until a
 *   KLOOP_EVENT_WRITE_RELEASE record of this stream with data == ref
 *   (flags KLOOP_COMPLETION_MORE, result 0) says the engine is done with
 *   them: once the kernel has taken the last of them, or when the queue is
 *   dropped (write error, abort, close). Every call that returns >= 0 gets
 *   exactly one such record, before the stream's CLOSED; when the kernel
 *   took all of them at once (as kloop_stream_write() sends to an idle
 *   stream), the record comes from the next poll. kloop_destroy()
 *   sends no records: once it returns the engine reads none of the bytes.
 *   Ordering, flow control and errors are those of kloop_stream_write().
 * Returns: as kloop_stream_write(); also -EINVAL (len 0: nothing to lend),
 *   -EOPNOTSUPP (a TLS stream: use kloop_stream_write()). On < 0 nothing is
 *   queued and no record comes.
 * Since: 0.1
 */
KLOOP_API int64_t kloop_stream_write_ref(kloop_t *loop, uint64_t token, const void *buf, size_t len,
                                         uint64_t ref);

/*
 * kloop_stream_set_limits - high/low water marks of the write queue in bytes
 *   (default 65536 / 16384). low <= high, else -EINVAL.
 * Returns: 0, -ENOENT, -EINVAL, -EBADF. Since: 0.1
 */
KLOOP_API int kloop_stream_set_limits(kloop_t *loop, uint64_t token, uint64_t high, uint64_t low);

/*
 * kloop_stream_write_size - bytes queued and not yet accepted by the kernel.
 * Returns: >= 0, -ENOENT, -EBADF. Since: 0.1
 */
KLOOP_API int64_t kloop_stream_write_size(kloop_t *loop, uint64_t token);

/*
 * kloop_stream_shutdown - once the queue is flushed, shutdown(fd, SHUT_WR)
 *   (sockets) and report WRITE_DONE. Later writes give -EPIPE.
 * Returns: 0, -ENOENT, -EPIPE (already shut or closing), -EBADF. Since: 0.1
 */
KLOOP_API int kloop_stream_shutdown(kloop_t *loop, uint64_t token);

/*
 * kloop_stream_close - graceful close: stop reading, flush the write queue,
 *   then (with KLOOP_STREAM_CLOSE_FD) close the fd, and report CLOSED with
 *   0 or the error that ended the flush. Writes are still accepted until
 *   the queue has been flushed; the close proceeds at the next poll.
 * Returns: 0, -ENOENT, -EALREADY (close or abort already asked), -EBADF.
 * Since: 0.1
 */
KLOOP_API int kloop_stream_close(kloop_t *loop, uint64_t token);

/*
 * kloop_stream_abort - drop the write queue, cancel everything in flight, and
 *   after the kernel has let go (close the fd and) report CLOSED with
 *   -ECANCELED. Allowed after kloop_stream_close() to cut a slow flush (if
 *   the close already finished, it returns 0 and CLOSED reports the close).
 * Returns: 0, -ENOENT, -EALREADY (already aborting), -EBADF. Since: 0.1
 */
KLOOP_API int kloop_stream_abort(kloop_t *loop, uint64_t token);

/* ---------------------------------------------------------------------- */
/* TLS on streams                                                          */
/* ---------------------------------------------------------------------- */

/*
 * kloop_stream_start_tls - run TLS on a stream, from now on: the engine
 *   drives `ssl`, an OpenSSL `SSL *` (void * so that this header needs no
 *   OpenSSL header) made by the same libssl that libkloop uses (see
 *   kloop_get_tls_info) and set up by the caller as client or server
 *   (SSL_set_connect_state/SSL_set_accept_state, SNI, host name checks,
 *   ALPN, session to resume). The engine takes a reference (SSL_up_ref),
 *   puts its own BIO under the SSL, starts the handshake at once, and drops
 *   the reference once the stream is CLOSED; the BIO it leaves behind then
 *   fails every read and write.
 *   Works on a new stream (attach, then start_tls before the next poll) and
 *   in place on one that has carried plain bytes (STARTTLS): bytes queued by
 *   kloop_stream_write() before this call go out unencrypted first; bytes
 *   received and not yet returned by kloop_poll() (also those held while
 *   paused) are taken as the start of the TLS stream.
 * While the handshake runs the engine reads even if the stream is paused;
 *   writes are queued and encrypted once it is over. Then:
 *   - KLOOP_EVENT_HANDSHAKE comes once: result 0 (aux: KLOOP_HANDSHAKE_KTLS_*
 *     bits of the directions kernel TLS took over), or -EPROTO (TLS failed:
 *     kloop_stream_tls_error() says how), -ECONNRESET (the peer closed),
 *     or the -errno of the socket. After a failed handshake the stream
 *     neither reads nor writes (nor reports a write error); close or abort it.
 *   - DATA records carry plaintext (in engine buffers, as for plain streams);
 *     kloop_stream_write() takes plaintext; kloop_stream_write_size() counts
 *     plaintext not yet encrypted plus encrypted bytes not yet sent. Writes
 *     that leave at most 16 KiB of plaintext waiting are encrypted at the
 *     next kloop_poll(), together: the pieces one iteration wrote share a
 *     record. A larger write encrypts what waits, then itself, at once.
 *   - EOF: aux 0 after the peer's close_notify, KLOOP_EOF_UNCLEAN when the
 *     connection ended without it.
 *   - ERROR with KLOOP_ERROR_TLS in aux: a TLS failure (alert received,
 *     record that does not decrypt), result -EPROTO.
 *   - kloop_stream_close() sends close_notify after the queued data (not
 *     when the socket already reached EOF), keeps reading (and dropping
 *     what arrives) until the peer's close_notify or EOF, then closes; the
 *     caller bounds that wait with kloop_stream_abort().
 *     kloop_stream_abort() sends nothing.
 *   - kloop_stream_shutdown() gives -EOPNOTSUPP (TLS has no half-close).
 * Kernel TLS: with KLOOP_CAP_KTLS enabled the engine sets SSL_OP_ENABLE_KTLS
 *   and hands the send key OpenSSL offers to the socket (TLS_TX) once what
 *   was encrypted before it has been sent; plaintext then goes to the socket
 *   as it is, other records with their type in a cmsg. The receive key is
 *   taken too where OpenSSL offers it (TLS 1.2): the handshake then reads
 *   exactly what OpenSSL asks for, and afterwards recvmsg hands plaintext
 *   to DATA records directly. A peer's request for a TLS 1.3 key update fails
 *   such a stream (ERROR, KLOOP_ERROR_WRITE | KLOOP_ERROR_TLS, -EPROTO): the
 *   kernel cannot change the key.
 * Sealing and opening: without KLOOP_CAP_KTLS (and without
 *   KLOOP_CONFIG_NO_TLS_SEAL) the engine sets SSL_OP_ENABLE_KTLS too, takes
 *   the send key OpenSSL offers (TLS 1.2 and 1.3, AES-GCM and
 *   ChaCha20-Poly1305) to encrypt the records it sends itself, and decrypts
 *   the peer's records itself (TLS 1.2: the receive key OpenSSL offers; TLS
 *   1.3: the peer's traffic secret, with OpenSSL 3.0 and 3.1, receive
 *   buffers of at least 18 KiB); OpenSSL then reads only the records that
 *   are not application data. For TLS 1.3 it installs a key-log callback on
 *   the SSL_CTX if it has none (SSL_CTX_set_keylog_callback: the traffic
 *   secrets give the keys and let it follow key updates); where the context
 *   has a callback of its own, OpenSSL keeps doing TLS 1.3's records. The
 *   SSL reports BIO_get_ktls_send() (and, when the engine opens,
 *   BIO_get_ktls_recv()) true; HANDSHAKE's aux has KLOOP_HANDSHAKE_KTLS_TX
 *   and _RX only when the kernel does the work.
 * The caller must not read or write through `ssl` while the engine drives
 *   it; queries (peer certificate, cipher, ALPN protocol, session) are fine.
 * SSL_MODE_RELEASE_BUFFERS (OpenSSL 3.0.14 and later): the engine clears
 *   the mode on `ssl` while it drives it, keeps OpenSSL's record buffers
 *   while the stream is in use and frees them once a kloop_poll() has been
 *   idle for 100 to 200 ms since the stream's last record; the mode is set
 *   again when the stream finishes.
 * Returns: 0, -ENOENT, -EINVAL (ssl NULL), -EALREADY (TLS already started),
 *   -EPIPE (stream closing, or reading already ended), -EOPNOTSUPP
 *   (KLOOP_STREAM_FILE or KLOOP_STREAM_NO_READ stream), -ENOMEM, -EBADF.
 * Since: 0.1
 */
KLOOP_API int kloop_stream_start_tls(kloop_t *loop, uint64_t token, void *ssl);

/*
 * struct kloop_tls_error - why TLS failed on a stream (the last failure).
 *   ssl_error:      SSL_get_error() of the failing call (SSL_ERROR_*), 0 if
 *                   none was recorded.
 *   lib, reason:    ERR_GET_LIB/ERR_GET_REASON of ERR_peek_last_error()
 *                   then (0 if the error queue was empty).
 *   verify_result:  SSL_get_verify_result() (X509_V_OK = 0).
 *   message:        the OpenSSL reason text, NUL-terminated ("" if none).
 *   verify_message: X509_verify_cert_error_string(verify_result) when that
 *                   is not X509_V_OK, else "".
 */
struct kloop_tls_error {
  uint32_t size;
  int32_t ssl_error;
  int32_t lib;
  int32_t reason;
  int64_t verify_result;
  char message[256];
  char verify_message[256];
};

/*
 * kloop_stream_tls_error - copy the last TLS failure of a stream into *out
 *   (out->size set by the caller, at least the 0.1 size). Valid until the
 *   stream's CLOSED record has been returned.
 * Returns: 0, -ENOENT (no such stream), -EINVAL (out NULL or size too
 *   small; or not a TLS stream), -EBADF. Since: 0.1
 */
KLOOP_API int kloop_stream_tls_error(kloop_t *loop, uint64_t token, struct kloop_tls_error *out);

/*
 * struct kloop_tls_info - the OpenSSL that libkloop runs with.
 *   version_num:  OpenSSL_version_num() of the loaded libcrypto.
 *   ssl_new_addr: the address of SSL_new as libkloop resolves it; an SSL
 *                 made by another copy of libssl in the process is not
 *                 one libkloop may drive (compare with the SSL_new that
 *                 the caller's library resolves).
 *   libssl_path:  the file libssl was loaded from ("" if unknown).
 *   version_text: OpenSSL_version(OPENSSL_VERSION).
 */
struct kloop_tls_info {
  uint32_t size;
  uint32_t reserved0;
  uint64_t version_num;
  uint64_t ssl_new_addr;
  char libssl_path[256];
  char version_text[128];
};

/*
 * kloop_get_tls_info - fill *out (out->size set by the caller).
 * Returns: 0, -EINVAL (out NULL or size too small). Thread safety: any
 *   thread. Since: 0.1
 */
KLOOP_API int kloop_get_tls_info(struct kloop_tls_info *out);

/* ---------------------------------------------------------------------- */
/* Statistics                                                              */
/* ---------------------------------------------------------------------- */

/*
 * struct kloop_stats - counters since the loop was created.
 */
struct kloop_stats {
  uint32_t size;
  uint32_t reserved0;
  uint64_t ops_in_flight;  /* operations and stream requests in the kernel */
  uint64_t streams;        /* attached streams not yet CLOSED */
  uint64_t buffers_in_use; /* receive buffers handed out or held */
  uint64_t polls;          /* kloop_poll() calls */
  uint64_t enters;         /* submit/wait calls the engine made into the kernel */
  uint64_t sqes;           /* submission entries queued */
  uint64_t cqes;           /* completion entries reaped */
  uint64_t completions;    /* records returned by kloop_poll() */
  uint64_t cq_overflows;   /* kernel CQ overflow count */
  uint64_t enobufs;        /* receive re-arms after running out of buffers */
  uint64_t direct_sends;   /* large stream writes sent at once (send(2)) */
  uint64_t buffers_released; /* idle receive buffers whose pages went back to the kernel */
  uint64_t reserved[4];
};

/*
 * kloop_get_stats - copy the counters. Returns: 0, -EBADF, -EINVAL.
 * Since: 0.1
 */
KLOOP_API int kloop_get_stats(kloop_t *loop, struct kloop_stats *stats);

/*
 * kloop_strerror - a static English text for a -errno result of this
 *   library (strerror of its absolute value). Never NULL. Since: 0.1
 */
KLOOP_API const char *kloop_strerror(int err);

#ifdef __cplusplus
}
#endif

#endif /* KLOOP_H */
