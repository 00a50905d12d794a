/*
 * echo_epoll - the baseline echo server: plain level-triggered epoll,
 * nonblocking sockets, one recv and one send per message, no threads.
 *
 * It is the reference the libkloop server (echo_kloop) is compared with, so
 * it is written the way a careful C programmer would write it, not the
 * slowest way: accepted sockets get TCP_NODELAY, a partial send parks the
 * rest of the data and stops reading until EPOLLOUT drains it.
 *
 * usage: echo_epoll [--host H] [--port P | --unix PATH] [--cpu N]
 * Prints "READY <port>" on stdout once it listens; exits on SIGINT/SIGTERM.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench_common.h"

#define RBUF_SIZE 65536

struct conn {
  int fd;
  bool out;    /* EPOLLOUT armed, reading paused */
  size_t plen; /* unsent bytes parked in pbuf */
  size_t pcap;
  char *pbuf;
};

static volatile sig_atomic_t stop;
static void on_signal(int sig) {
  (void)sig;
  stop = 1;
}

static void conn_close(int ep, struct conn *c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  free(c->pbuf);
  free(c);
}

/* Park bytes that the kernel did not take; switch to waiting for EPOLLOUT. */
static bool park(int ep, struct conn *c, const char *data, size_t n) {
  if (c->plen + n > c->pcap) {
    size_t cap = c->pcap ? c->pcap : 4096;
    while (cap < c->plen + n) cap *= 2;
    char *p = realloc(c->pbuf, cap);
    if (!p) return false;
    c->pbuf = p;
    c->pcap = cap;
  }
  memcpy(c->pbuf + c->plen, data, n);
  c->plen += n;
  if (!c->out) {
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->out = true;
  }
  return true;
}

/* Send as much of data as the socket takes; returns bytes sent or -1. */
static ssize_t send_some(int fd, const char *data, size_t n) {
  size_t done = 0;
  while (done < n) {
    ssize_t w = send(fd, data + done, n - done, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      return -1;
    }
    done += (size_t)w;
  }
  return (ssize_t)done;
}

int main(int argc, char **argv) {
  struct bench_args args;
  bench_parse_args(&args, argc, argv, "echo_epoll");
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);

  int lfd = bench_listen(&args, true);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
  bench_ready(&args, lfd);

  static char rbuf[RBUF_SIZE];
  struct epoll_event evs[256];
  while (!stop) {
    int n = epoll_wait(ep, evs, 256, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      perror("epoll_wait");
      return 1;
    }
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (!c) { /* listening socket */
        for (;;) {
          int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (fd < 0) break;
          if (!args.unix_path) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          }
          struct conn *nc = calloc(1, sizeof(*nc));
          if (!nc) {
            close(fd);
            continue;
          }
          nc->fd = fd;
          struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
          epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
        continue;
      }
      if (c->out) { /* flushing parked bytes */
        ssize_t w = send_some(c->fd, c->pbuf, c->plen);
        if (w < 0) {
          conn_close(ep, c);
          continue;
        }
        memmove(c->pbuf, c->pbuf + w, c->plen - (size_t)w);
        c->plen -= (size_t)w;
        if (c->plen == 0) {
          struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
          epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
          c->out = false;
        }
        continue;
      }
      ssize_t r = recv(c->fd, rbuf, sizeof(rbuf), 0);
      if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        conn_close(ep, c);
        continue;
      }
      if (r < 0) continue;
      ssize_t w = send_some(c->fd, rbuf, (size_t)r);
      if (w < 0 || (w < r && !park(ep, c, rbuf + w, (size_t)(r - w)))) conn_close(ep, c);
    }
  }
  return 0;
}
