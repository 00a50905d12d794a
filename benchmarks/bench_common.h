/*
 * bench_common.h - command line, listening socket and readiness line shared
 * by the native echo servers (echo_epoll, echo_kloop).
 *
 * Both servers take the same options and print "READY <port>" (or
 * "READY <path>") on stdout once they listen, which benchmarks/run.py waits
 * for. Port 0 picks a free port.
 */
#ifndef KLOOP_BENCH_COMMON_H
#define KLOOP_BENCH_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

struct bench_args {
  const char *host;
  int port;
  const char *unix_path;
  int cpu;
  int backlog;
};

static void bench_usage(const char *prog, FILE *f) {
  fprintf(f,
          "usage: %s [--host H] [--port P | --unix PATH] [--cpu N] [--backlog N]\n"
          "  --host H      address to listen on (default 127.0.0.1)\n"
          "  --port P      TCP port, 0 for any free port (default 8000)\n"
          "  --unix PATH   listen on a Unix stream socket instead\n"
          "  --cpu N       pin the server to CPU N\n"
          "  --backlog N   listen backlog (default 4096)\n"
          "Prints \"READY <port|path>\" once listening; SIGINT/SIGTERM stop it.\n",
          prog);
}

static void bench_parse_args(struct bench_args *a, int argc, char **argv, const char *prog) {
  *a = (struct bench_args){.host = "127.0.0.1", .port = 8000, .cpu = -1, .backlog = 4096};
  static const struct option longopts[] = {{"host", required_argument, 0, 'H'},
                                           {"port", required_argument, 0, 'P'},
                                           {"unix", required_argument, 0, 'U'},
                                           {"cpu", required_argument, 0, 'C'},
                                           {"backlog", required_argument, 0, 'B'},
                                           {"help", no_argument, 0, 'h'},
                                           {0, 0, 0, 0}};
  int ch;
  while ((ch = getopt_long(argc, argv, "H:P:U:C:B:h", longopts, NULL)) != -1) {
    switch (ch) {
      case 'H':
        a->host = optarg;
        break;
      case 'P':
        a->port = atoi(optarg);
        break;
      case 'U':
        a->unix_path = optarg;
        break;
      case 'C':
        a->cpu = atoi(optarg);
        break;
      case 'B':
        a->backlog = atoi(optarg);
        break;
      case 'h':
        bench_usage(prog, stdout);
        exit(0);
      default:
        bench_usage(prog, stderr);
        exit(2);
    }
  }
  if (a->cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(a->cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) < 0) {
      perror("sched_setaffinity");
      exit(2);
    }
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

/* A listening socket (nonblocking if asked); exits with a message on error. */
static int bench_listen(const struct bench_args *a, bool nonblock) {
  int type = SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0);
  int fd;
  if (a->unix_path) {
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    if (strlen(a->unix_path) >= sizeof(un.sun_path)) {
      fprintf(stderr, "unix path too long\n");
      exit(2);
    }
    strcpy(un.sun_path, a->unix_path);
    unlink(a->unix_path);
    fd = socket(AF_UNIX, type, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&un, sizeof(un)) < 0) {
      perror("bind");
      exit(2);
    }
  } else {
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)a->port)};
    struct sockaddr_in in4 = {.sin_family = AF_INET, .sin_port = htons((uint16_t)a->port)};
    bool v6 = strchr(a->host, ':') != NULL;
    if ((v6 ? inet_pton(AF_INET6, a->host, &in6.sin6_addr)
            : inet_pton(AF_INET, a->host, &in4.sin_addr)) != 1) {
      fprintf(stderr, "not a numeric address: %s\n", a->host);
      exit(2);
    }
    fd = socket(v6 ? AF_INET6 : AF_INET, type, IPPROTO_TCP);
    int one = 1;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (fd < 0 || bind(fd, v6 ? (struct sockaddr *)&in6 : (struct sockaddr *)&in4,
                       v6 ? sizeof(in6) : sizeof(in4)) < 0) {
      perror("bind");
      exit(2);
    }
  }
  if (listen(fd, a->backlog) < 0) {
    perror("listen");
    exit(2);
  }
  return fd;
}

static void bench_ready(const struct bench_args *a, int lfd) {
  if (a->unix_path) {
    printf("READY %s\n", a->unix_path);
  } else {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    getsockname(lfd, (struct sockaddr *)&ss, &len);
    int port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                        : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    printf("READY %d\n", port);
  }
  fflush(stdout);
}

#endif
