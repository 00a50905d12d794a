/*
 * echo_client - drives an echo server over TCP with libkloop and checks
 * every byte that comes back.
 *
 *   echo_client HOST PORT [CONNECTIONS [MESSAGES [SIZE]]]
 *
 * Opens CONNECTIONS (default 4) connections to HOST:PORT (an IPv4 address)
 * with kloop_submit_connect(), then on each sends MESSAGES (default 100)
 * messages of SIZE bytes (default 1024) one at a time, waiting for the whole
 * echo of one before sending the next. Then it shuts down its write side,
 * waits for the server to close, and prints a summary. Exits 0 when every
 * byte came back in order, 1 otherwise (or after 60 s without finishing).
 *
 * Build against an installed libkloop:
 *   cc -O2 echo_client.c $(pkg-config --cflags --libs kloop) -o echo_client
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <kloop.h>

#define BATCH 64
#define DEADLINE_NS (60 * 1000000000LL)

enum phase { CONNECTING, ECHOING, CLOSING, DONE };

struct conn {
  int fd;
  enum phase phase;
  long sent;     /* messages written */
  size_t echoed; /* bytes of the current message received back */
};

static long messages;
static size_t size;
static unsigned char *payload;

/* The byte at offset j of message m on connection i: differs between
 * connections and messages, so a mixed-up echo is caught. */
static unsigned char pattern(size_t i, long m, size_t j) {
  return (unsigned char)(i * 7 + (size_t)m * 13 + j);
}

static void fill(size_t i, long m) {
  for (size_t j = 0; j < size; j++) payload[j] = pattern(i, m, j);
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Connection i uses token i + 1, first for its connect, then for its stream:
 * a token may be reused once its final completion has been returned. */
static uint64_t token_of(size_t i) { return (uint64_t)i + 1; }

static int send_next(kloop_t *loop, struct conn *c, size_t i) {
  if (c->sent == messages) {
    c->phase = CLOSING;
    return kloop_stream_shutdown(loop, token_of(i)); /* the server sees EOF */
  }
  fill(i, c->sent);
  int64_t queued = kloop_stream_write(loop, token_of(i), payload, size);
  if (queued < 0) return (int)queued;
  c->sent++;
  c->echoed = 0;
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3 || argc > 6) {
    fprintf(stderr, "usage: %s HOST PORT [CONNECTIONS [MESSAGES [SIZE]]]\n", argv[0]);
    return 2;
  }
  struct sockaddr_in addr;
  memset(&addr, 0, sizeof addr);
  addr.sin_family = AF_INET;
  addr.sin_port = htons((uint16_t)atoi(argv[2]));
  if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
    fprintf(stderr, "echo_client: %s is not an IPv4 address\n", argv[1]);
    return 2;
  }
  size_t nconn = argc > 3 ? (size_t)atol(argv[3]) : 4;
  messages = argc > 4 ? atol(argv[4]) : 100;
  size = argc > 5 ? (size_t)atol(argv[5]) : 1024;
  if (nconn == 0 || messages < 0 || size == 0) {
    fprintf(stderr, "echo_client: CONNECTIONS and SIZE must be > 0\n");
    return 2;
  }

  struct conn *conns = calloc(nconn, sizeof *conns);
  payload = malloc(size);
  if (!conns || !payload) return 1;

  kloop_t *loop;
  int rc = kloop_create(NULL, &loop);
  if (rc < 0) {
    fprintf(stderr, "echo_client: kloop_create: %s\n", kloop_strerror(rc));
    return 1;
  }

  for (size_t i = 0; i < nconn; i++) {
    conns[i].fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_TCP);
    if (conns[i].fd < 0) {
      perror("echo_client: socket");
      return 1;
    }
    int one = 1;
    setsockopt(conns[i].fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    rc = kloop_submit_connect(loop, token_of(i), conns[i].fd, &addr, sizeof addr);
    if (rc < 0) {
      fprintf(stderr, "echo_client: kloop_submit_connect: %s\n", kloop_strerror(rc));
      return 1;
    }
  }

  int64_t start = now_ns();
  size_t done = 0;
  int failed = 0;
  struct kloop_completion rec[BATCH];
  while (done < nconn && !failed) {
    if (now_ns() - start > DEADLINE_NS) {
      fprintf(stderr, "echo_client: no end after 60 s\n");
      failed = 1;
      break;
    }
    int n = kloop_poll(loop, rec, BATCH, 1000000000LL);
    if (n == -EINTR) continue;
    if (n < 0) {
      fprintf(stderr, "echo_client: kloop_poll: %s\n", kloop_strerror(n));
      failed = 1;
      break;
    }
    for (int k = 0; k < n && !failed; k++) {
      const struct kloop_completion *r = &rec[k];
      size_t i = (size_t)(r->token - 1);
      if (r->token == 0 || i >= nconn) continue;
      struct conn *c = &conns[i];

      if (c->phase == CONNECTING) {
        if (r->result < 0) {
          fprintf(stderr, "echo_client: connect: %s\n", kloop_strerror(r->result));
          failed = 1;
          break;
        }
        rc = kloop_stream_attach(loop, token_of(i), c->fd,
                                 KLOOP_STREAM_SOCKET | KLOOP_STREAM_CLOSE_FD);
        if (rc < 0) {
          fprintf(stderr, "echo_client: attach: %s\n", kloop_strerror(rc));
          failed = 1;
          break;
        }
        c->phase = ECHOING;
        rc = send_next(loop, c, i);
        if (rc < 0) {
          fprintf(stderr, "echo_client: write: %s\n", kloop_strerror(rc));
          failed = 1;
        }
        continue;
      }

      switch (r->event) {
        case KLOOP_EVENT_DATA: {
          const unsigned char *p = (const unsigned char *)(uintptr_t)r->data;
          for (int32_t j = 0; j < r->result; j++, c->echoed++) {
            if (c->phase != ECHOING || c->echoed >= size ||
                p[j] != pattern(i, c->sent - 1, c->echoed)) {
              fprintf(stderr, "echo_client: connection %zu message %ld: wrong byte at offset %zu\n",
                      i, c->sent - 1, c->echoed);
              failed = 1;
              break;
            }
          }
          if (!failed && c->echoed == size) {
            rc = send_next(loop, c, i);
            if (rc < 0) {
              fprintf(stderr, "echo_client: write: %s\n", kloop_strerror(rc));
              failed = 1;
            }
          }
          break;
        }
        case KLOOP_EVENT_EOF:
          if (c->phase != CLOSING) {
            fprintf(stderr, "echo_client: connection %zu closed by the server after %ld messages\n",
                    i, c->sent);
            failed = 1;
          }
          kloop_stream_close(loop, token_of(i));
          break;
        case KLOOP_EVENT_ERROR:
          fprintf(stderr, "echo_client: connection %zu: %s\n", i, kloop_strerror(r->result));
          failed = 1;
          break;
        case KLOOP_EVENT_CLOSED:
          c->phase = DONE;
          done++;
          break;
        default: /* WRITE_LOW, WRITE_DONE */
          break;
      }
    }
  }
  double ms = (double)(now_ns() - start) / 1e6;
  kloop_destroy(loop); /* aborts whatever is left and closes the stream fds */
  if (failed) return 1;
  printf("echo_client: %zu connections x %ld messages x %zu bytes echoed intact in %.1f ms\n",
         nconn, messages, size, ms);
  free(conns);
  free(payload);
  return 0;
}
