/*
 * echo_server - a TCP echo server on libkloop.
 *
 *   echo_server PORT [CONNECTIONS]
 *
 * Listens on 127.0.0.1:PORT (0 picks a free port), prints
 * "listening on 127.0.0.1:<port>" once ready, and echoes every byte back.
 * With CONNECTIONS > 0 it exits 0 after that many connections have closed;
 * with 0 (the default) it runs until SIGINT or SIGTERM.
 *
 * What it shows:
 *   - one multishot accept: a completion per new connection, all with the
 *     same token, flagged KLOOP_COMPLETION_MORE while the accept goes on;
 *   - engine-driven streams: each connection is attached once; received
 *     bytes arrive as KLOOP_EVENT_DATA records pointing into the engine's
 *     buffers, and kloop_stream_write() copies them into the stream's queue;
 *   - flow control: when a peer does not read, the write queue grows past the
 *     high-water mark; the server stops reading that connection until the
 *     engine reports KLOOP_EVENT_WRITE_LOW;
 *   - one kloop_poll() per loop iteration does all the waiting.
 *
 * Build against an installed libkloop:
 *   cc -O2 echo_server.c $(pkg-config --cflags --libs kloop) -o echo_server
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <kloop.h>

/* Token of the multishot accept; streams use 1, 2, 3, ... */
#define ACCEPT_TOKEN UINT64_C(0)
#define BATCH 64
/* Write-queue marks: stop reading a connection whose queue passes HIGH,
 * resume when the engine reports it drained to LOW. */
#define HIGH_WATER (256 * 1024)
#define LOW_WATER (64 * 1024)

static volatile sig_atomic_t stopping;

static void on_signal(int sig) {
  (void)sig;
  stopping = 1;
}

static int listen_on(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
  if (fd < 0) return -errno;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_port = htons((uint16_t)port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 512) < 0) {
    int err = -errno;
    close(fd);
    return err;
  }
  return fd;
}

static int bound_port(int fd) {
  struct sockaddr_in addr;
  socklen_t len = sizeof addr;
  if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0) return -errno;
  return ntohs(addr.sin_port);
}

static int fail(const char *what, int err) {
  fprintf(stderr, "echo_server: %s: %s\n", what, kloop_strerror(err));
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: %s PORT [CONNECTIONS]\n", argv[0]);
    return 2;
  }
  int port = atoi(argv[1]);
  long want = argc > 2 ? atol(argv[2]) : 0;

  /* No SA_RESTART: a signal during kloop_poll() makes it return -EINTR. */
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  int lfd = listen_on(port);
  if (lfd < 0) return fail("listen", lfd);

  kloop_t *loop;
  int rc = kloop_create(NULL, &loop);
  if (rc < 0) return fail("kloop_create", rc);

  rc = kloop_submit_accept(loop, ACCEPT_TOKEN, lfd, KLOOP_OP_MULTISHOT);
  if (rc < 0) return fail("kloop_submit_accept", rc);
  printf("listening on 127.0.0.1:%d\n", bound_port(lfd));
  fflush(stdout);

  uint64_t next_token = 1;
  long closed = 0, open_streams = 0, pauses = 0;
  int status = 0;
  struct kloop_completion rec[BATCH];

  while (!stopping && (want == 0 || closed < want)) {
    int n = kloop_poll(loop, rec, BATCH, -1);
    if (n == -EINTR) continue;
    if (n < 0) {
      status = fail("kloop_poll", n);
      break;
    }
    for (int i = 0; i < n; i++) {
      const struct kloop_completion *c = &rec[i];
      if (c->token == ACCEPT_TOKEN) {
        if (c->result >= 0) {
          int fd = c->result;
          int one = 1;
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
          uint64_t token = next_token++;
          rc = kloop_stream_attach(loop, token, fd, KLOOP_STREAM_SOCKET | KLOOP_STREAM_CLOSE_FD);
          if (rc < 0) {
            fprintf(stderr, "echo_server: attach: %s\n", kloop_strerror(rc));
            close(fd);
          } else {
            open_streams++;
            kloop_stream_set_limits(loop, token, HIGH_WATER, LOW_WATER);
          }
        } else if (c->result != -ECANCELED) {
          fprintf(stderr, "echo_server: accept: %s\n", kloop_strerror(c->result));
        }
        /* Without MORE the multishot accept has ended (an error, or the
         * kernel stopped it): arm a new one. */
        if (!(c->flags & KLOOP_COMPLETION_MORE) && !stopping) {
          rc = kloop_submit_accept(loop, ACCEPT_TOKEN, lfd, KLOOP_OP_MULTISHOT);
          if (rc < 0) {
            status = fail("kloop_submit_accept", rc);
            stopping = 1;
          }
        }
        continue;
      }

      switch (c->event) {
        case KLOOP_EVENT_DATA: {
          /* The bytes live in an engine buffer until the next kloop_poll();
           * kloop_stream_write() copies them. */
          int64_t queued = kloop_stream_write(loop, c->token, (const void *)(uintptr_t)c->data,
                                              (size_t)c->result);
          if (queued < 0)
            kloop_stream_abort(loop, c->token);
          else if (queued > HIGH_WATER && kloop_stream_pause(loop, c->token) == 0)
            pauses++;
          break;
        }
        case KLOOP_EVENT_WRITE_LOW:
          kloop_stream_resume(loop, c->token);
          break;
        case KLOOP_EVENT_EOF:
          /* The peer is done sending: flush what is queued, then close. */
          kloop_stream_close(loop, c->token);
          break;
        case KLOOP_EVENT_ERROR:
          kloop_stream_abort(loop, c->token);
          break;
        case KLOOP_EVENT_CLOSED:
          open_streams--;
          closed++;
          break;
        default:
          break;
      }
    }
  }

  /* kloop_destroy() cancels the accept and aborts open streams; it closes
   * the stream fds (KLOOP_STREAM_CLOSE_FD) once the kernel has let go. */
  kloop_destroy(loop);
  close(lfd);
  fprintf(stderr, "echo_server: %ld connections served, %ld still open at exit, ", closed,
          open_streams);
  fprintf(stderr, "asked to pause reading %ld times\n", pauses);
  return status;
}
