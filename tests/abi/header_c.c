/*
 * The public header must stand alone: included first, with nothing before
 * it, in strict C11 with every warning an error (see check_header.py for the
 * flags). The assertions pin the layout of the public structs: a change here
 * is an ABI break and needs a new KLOOP_VERSION_MAJOR.
 */
#include "kloop.h"
#include "kloop.h" /* the include guard works */

#include <stddef.h>

#define LAYOUT(type, member, offset) \
  _Static_assert(offsetof(type, member) == (offset), #type "." #member " moved")

_Static_assert(sizeof(struct kloop_completion) == 32, "kloop_completion is 32 bytes");
LAYOUT(struct kloop_completion, token, 0);
LAYOUT(struct kloop_completion, result, 8);
LAYOUT(struct kloop_completion, flags, 12);
LAYOUT(struct kloop_completion, data, 16);
LAYOUT(struct kloop_completion, event, 24);
LAYOUT(struct kloop_completion, aux, 28);

_Static_assert(sizeof(struct kloop_caps) == 360, "kloop_caps size");
LAYOUT(struct kloop_caps, size, 0);
LAYOUT(struct kloop_caps, features, 4);
LAYOUT(struct kloop_caps, kernel, 8);
LAYOUT(struct kloop_caps, enabled, 16);
LAYOUT(struct kloop_caps, sq_entries, 24);
LAYOUT(struct kloop_caps, cq_entries, 28);
LAYOUT(struct kloop_caps, buf_size, 32);
LAYOUT(struct kloop_caps, buf_count, 36);
LAYOUT(struct kloop_caps, opcodes, 40);
LAYOUT(struct kloop_caps, reserved, 296);

_Static_assert(sizeof(struct kloop_config) == 88, "kloop_config size");
LAYOUT(struct kloop_config, size, 0);
LAYOUT(struct kloop_config, sq_entries, 4);
LAYOUT(struct kloop_config, cq_entries, 8);
LAYOUT(struct kloop_config, flags, 12);
LAYOUT(struct kloop_config, disable, 16);
LAYOUT(struct kloop_config, buf_size, 24);
LAYOUT(struct kloop_config, buf_count, 28);
LAYOUT(struct kloop_config, sqpoll_idle_ms, 32);
LAYOUT(struct kloop_config, reserved0, 36);
LAYOUT(struct kloop_config, reserved, 40);

_Static_assert(sizeof(struct kloop_stats) == 136, "kloop_stats size");
LAYOUT(struct kloop_stats, size, 0);
LAYOUT(struct kloop_stats, ops_in_flight, 8);
LAYOUT(struct kloop_stats, enobufs, 80);
LAYOUT(struct kloop_stats, direct_sends, 88);
LAYOUT(struct kloop_stats, buffers_released, 96);
LAYOUT(struct kloop_stats, reserved, 104);

_Static_assert(KLOOP_VERSION ==
                   ((KLOOP_VERSION_MAJOR << 16) | (KLOOP_VERSION_MINOR << 8) | KLOOP_VERSION_PATCH),
               "KLOOP_VERSION packs major.minor.patch");
_Static_assert(KLOOP_OFFSET_CURRENT == UINT64_MAX, "KLOOP_OFFSET_CURRENT");

/* Every prototype is usable from C with the types the header names. */
typedef uint32_t (*version_fn)(void);
typedef int (*poll_fn)(kloop_t *, struct kloop_completion *, uint32_t, int64_t);
typedef int64_t (*write_fn)(kloop_t *, uint64_t, const void *, size_t);

int header_c_check(void);
int header_c_check(void) {
  version_fn v = kloop_version;
  poll_fn p = kloop_poll;
  write_fn w = kloop_stream_write;
  return v != 0 && p != 0 && w != 0;
}
