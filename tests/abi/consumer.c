/*
 * A program built only from an installed prefix (`pkg-config --cflags --libs
 * kloop`): it checks the version, tells where the library was loaded from,
 * and makes one nop round trip through the kernel.
 *
 * Exit status: 0 ok, 1 failure, 77 io_uring is not available here (the
 * meson convention for "skipped"; the reason is printed).
 */
#include <errno.h>
#include <kloop.h>
#include <stdio.h>
#include <string.h>

#define CHECK(cond, ...)                         \
  do {                                           \
    if (!(cond)) {                               \
      fprintf(stderr, "consumer: " __VA_ARGS__); \
      fputc('\n', stderr);                       \
      return 1;                                  \
    }                                            \
  } while (0)

/* Prints the path of every libkloop mapped into this process. */
static void print_loaded_from(void) {
  FILE *maps = fopen("/proc/self/maps", "r");
  char line[4096], last[4096] = "";
  if (!maps) return;
  while (fgets(line, sizeof line, maps)) {
    char *path = strchr(line, '/');
    if (path && strstr(path, "/libkloop.so") && strcmp(path, last) != 0) {
      printf("loaded %s", path);
      snprintf(last, sizeof last, "%s", path);
    }
  }
  fclose(maps);
}

int main(void) {
  print_loaded_from();

  uint32_t v = kloop_version();
  printf("kloop_version() = %u.%u.%u, header %d.%d.%d\n", v >> 16, (v >> 8) & 0xff, v & 0xff,
         KLOOP_VERSION_MAJOR, KLOOP_VERSION_MINOR, KLOOP_VERSION_PATCH);
  CHECK(v == KLOOP_VERSION, "library version %#x differs from the header's %#x", v,
        (unsigned)KLOOP_VERSION);
  CHECK(kloop_destroy(NULL) == -EBADF, "kloop_destroy(NULL) is not -EBADF");
  CHECK(kloop_strerror(-EINVAL) != NULL, "kloop_strerror returned NULL");

  kloop_t *loop = NULL;
  int rc = kloop_create(NULL, &loop);
  if (rc == -ENOSYS || rc == -EPERM) {
    printf("SKIP: io_uring is not available here: kloop_create: %s\n", kloop_strerror(rc));
    return 77;
  }
  CHECK(rc == 0 && loop != NULL, "kloop_create: %s", kloop_strerror(rc));

  rc = kloop_submit_nop(loop, 0x6b6c6f6f70ull);
  CHECK(rc == 0, "kloop_submit_nop: %s", kloop_strerror(rc));
  struct kloop_completion rec[4];
  memset(rec, 0xff, sizeof rec);
  rc = kloop_poll(loop, rec, 4, 1000000000);
  CHECK(rc == 1, "kloop_poll returned %d (%s), want 1 record", rc,
        rc < 0 ? kloop_strerror(rc) : "records");
  CHECK(rec[0].token == 0x6b6c6f6f70ull, "token %#llx", (unsigned long long)rec[0].token);
  CHECK(rec[0].result == 0, "nop result %d", rec[0].result);
  CHECK(rec[0].flags == 0, "nop flags %#x (MORE on a one-shot op)", rec[0].flags);
  CHECK(rec[0].event == KLOOP_EVENT_OP, "nop event %u", rec[0].event);
  rc = kloop_poll(loop, rec, 4, 0);
  CHECK(rc == 0, "a second poll returned %d, want 0 (one completion per submit)", rc);
  CHECK(kloop_destroy(loop) == 0, "kloop_destroy failed");
  printf("nop round trip ok\n");
  return 0;
}
