/*
 * echo_kloop - the echo server on libkloop's C ABI: one multishot accept,
 * every connection an engine-owned stream (kloop_stream_attach), every
 * received chunk handed back with kloop_stream_write. One kloop_poll() per
 * loop iteration is the only call that enters the kernel on the data path.
 *
 * Same options and readiness line as echo_epoll (see bench_common.h), so
 * benchmarks/run.py drives both the same way. For experiments the engine's
 * config can be changed from the environment (unset: kloop's defaults):
 *   ECHO_KLOOP_BUF_SIZE, ECHO_KLOOP_BUF_COUNT  receive buffers (kloop_config)
 *   ECHO_KLOOP_FLAGS    kloop_config.flags (e.g. 2 = NO_DEFER_TASKRUN)
 *   ECHO_KLOOP_DISABLE  kloop_config.disable, KLOOP_CAP_* bits (0x... ok)
 *   ECHO_KLOOP_BATCH    records asked for per kloop_poll() (1..256, default 256)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench_common.h"
#include "kloop.h"

#define TOKEN_ACCEPT 1u
#define BATCH 256

/* Read pauses when this much is queued for sending, resumes at WRITE_LOW. */
#define HIGH_WATER (1u << 20)
#define LOW_WATER (256u << 10)

static volatile sig_atomic_t stop;
static void on_signal(int sig) {
  (void)sig;
  stop = 1;
}

static void fail(const char *what, int rc) {
  fprintf(stderr, "echo_kloop: %s: %s\n", what, kloop_strerror(rc));
  exit(1);
}

/* Sets *field from the environment variable `name` when it is set. */
static void env_u64(const char *name, uint64_t *field) {
  const char *v = getenv(name);
  if (v && *v) *field = strtoull(v, NULL, 0);
}

static void config_from_env(struct kloop_config *cfg) {
  uint64_t v;
  v = cfg->buf_size;
  env_u64("ECHO_KLOOP_BUF_SIZE", &v);
  cfg->buf_size = (uint32_t)v;
  v = cfg->buf_count;
  env_u64("ECHO_KLOOP_BUF_COUNT", &v);
  cfg->buf_count = (uint32_t)v;
  v = cfg->flags;
  env_u64("ECHO_KLOOP_FLAGS", &v);
  cfg->flags = (uint32_t)v;
  env_u64("ECHO_KLOOP_DISABLE", &cfg->disable);
}

int main(int argc, char **argv) {
  struct bench_args args;
  bench_parse_args(&args, argc, argv, "echo_kloop");
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);

  struct kloop_config cfg;
  kloop_config_init(&cfg);
  config_from_env(&cfg);
  kloop_t *loop = NULL;
  int rc = kloop_create(&cfg, &loop);
  if (rc < 0) fail("kloop_create", rc);
  int lfd = bench_listen(&args, false);
  rc = kloop_submit_accept(loop, TOKEN_ACCEPT, lfd, KLOOP_OP_MULTISHOT);
  if (rc < 0) fail("kloop_submit_accept", rc);
  bench_ready(&args, lfd);

  uint64_t next_token = TOKEN_ACCEPT + 1;
  struct kloop_completion cs[BATCH];
  uint64_t batch = BATCH;
  env_u64("ECHO_KLOOP_BATCH", &batch);
  if (batch < 1 || batch > BATCH) batch = BATCH;
  while (!stop) {
    int n = kloop_poll(loop, cs, (uint32_t)batch, -1);
    if (n == -EINTR) continue;
    if (n < 0) fail("kloop_poll", n);
    for (int i = 0; i < n; i++) {
      const struct kloop_completion *c = &cs[i];
      if (c->token == TOKEN_ACCEPT) {
        if (c->result >= 0) {
          int fd = c->result;
          if (!args.unix_path) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          }
          uint64_t tok = next_token++;
          if (kloop_stream_attach(loop, tok, fd, KLOOP_STREAM_CLOSE_FD) < 0)
            close(fd);
          else
            kloop_stream_set_limits(loop, tok, HIGH_WATER, LOW_WATER);
        }
        if (!(c->flags & KLOOP_COMPLETION_MORE)) {
          rc = kloop_submit_accept(loop, TOKEN_ACCEPT, lfd, KLOOP_OP_MULTISHOT);
          if (rc < 0) fail("kloop_submit_accept (re-arm)", rc);
        }
        continue;
      }
      switch (c->event) {
        case KLOOP_EVENT_DATA: {
          int64_t queued = kloop_stream_write(loop, c->token, (const void *)(uintptr_t)c->data,
                                              (size_t)c->result);
          if (queued < 0)
            kloop_stream_abort(loop, c->token);
          else if (queued > (int64_t)HIGH_WATER)
            kloop_stream_pause(loop, c->token);
          break;
        }
        case KLOOP_EVENT_WRITE_LOW:
          kloop_stream_resume(loop, c->token);
          break;
        case KLOOP_EVENT_EOF:
          kloop_stream_close(loop, c->token);
          break;
        case KLOOP_EVENT_ERROR:
          kloop_stream_abort(loop, c->token);
          break;
        default: /* CLOSED, WRITE_DONE: nothing to do */
          break;
      }
    }
  }
  kloop_destroy(loop);
  close(lfd);
  return 0;
}
