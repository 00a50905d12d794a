#!/usr/bin/python3
"""Write the seed corpora of the libkloop fuzz targets (deterministic).

fuzz_ops seeds are built with the decoder's layout (see fuzz_ops.cc) so
that each one drives a meaningful scenario; the rest are random bytes from
a fixed seed. Run from anywhere: ./fuzz/make_corpus.py
"""
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# fuzz_ops opcodes (enum Opcode in fuzz_ops.cc)
(NOP, TIMEOUT, RECV, SEND, RECVMSG, SENDMSG, READ, WRITE, POLL, ACCEPT, CONNECT,
 SHUTDOWN, CANCEL, CANCEL_FD, LOOP_POLL, ATTACH, STREAM_WRITE, PAUSE_RESUME,
 STREAM_SHUTDOWN, STREAM_CLOSE, STREAM_ABORT, SET_LIMITS, PEER_WRITE, PEER_READ,
 SPLICE, CLOSE, CHILD_EXIT, WRITE_SIZE, DESTROY) = range(29)
# fd indices (struct Fds in harness.h)
SOCK_A, SOCK_B, DGRAM_A, DGRAM_B, PIPE_R, PIPE_W, FILE, LISTENER = range(8)
# attach selector: b % 5 picks sockA, sockB, pipeR, pipeW, dgramA; bits 3..6 flags
FLAG_FILE, FLAG_CLOSE_FD, FLAG_PAUSED, FLAG_NO_READ = 1, 2, 4, 8
WRAP = 0x80  # token byte with the high bit: UINT64_MAX - (b & 7)


def u16(v):
    return struct.pack('<H', v & 0xffff)


class Ops:
    def __init__(self, sizes=0x15, disable=0):
        self.b = bytearray([sizes, disable])

    def op(self, code, tok, *args):
        self.b += bytes([code, tok])
        for a in args:
            self.b += a if isinstance(a, (bytes, bytearray)) else bytes([a])
        return self

    def poll(self, n=4, wait=True):
        for _ in range(n):
            self.op(LOOP_POLL, 0, 0x1f if wait else 0x0f)
        return self

    def attach(self, tok, which, flags):
        return self.op(ATTACH, tok, (flags << 3) | which)


def ops_seeds():
    s = {}
    s['nops'] = Ops().op(NOP, 1).op(NOP, 2).op(NOP, 1).poll(2).op(NOP, 1).poll(1)
    s['nops_wrap'] = Ops().op(NOP, WRAP | 0).op(NOP, WRAP | 7).op(NOP, 0).poll(3)
    s['timeout_cancel'] = (Ops().op(TIMEOUT, 3, 200).op(TIMEOUT, 4, 1).poll(2)
                           .op(CANCEL, 3).op(CANCEL, 3).poll(3).op(CANCEL, 9))
    s['recv_send'] = (Ops().op(RECV, 1, SOCK_A, u16(100), 0).op(SEND, 2, SOCK_B, u16(50))
                      .poll(3).op(RECV, 1, SOCK_A, u16(0), 1).op(PEER_WRITE, 0, SOCK_B, u16(10)).poll(3))
    s['recvmsg_sendmsg'] = (Ops().op(RECVMSG, 1, DGRAM_B, u16(64)).op(SENDMSG, 2, DGRAM_A, u16(32), 0)
                            .op(SENDMSG, 3, DGRAM_A, u16(32), 1).poll(4))
    s['pipe_rw'] = (Ops().op(READ, 1, PIPE_R, u16(10), 1).op(WRITE, 2, PIPE_W, u16(5), 1)
                    .poll(3).op(READ, 3, FILE, u16(4096), 0, u16(100)).op(WRITE, 4, FILE, u16(10), 0, u16(4090)).poll(3))
    s['poll_multishot'] = (Ops().op(POLL, 5, PIPE_R, 0, 1).poll(1).op(PEER_WRITE, 0, PIPE_W, u16(1))
                           .poll(2).op(PEER_WRITE, 0, PIPE_W, u16(1)).poll(2).op(CANCEL, 5).poll(3))
    s['accept_connect'] = (Ops().op(ACCEPT, 1, 0).op(CONNECT, 2).poll(3).op(ACCEPT, 3, 1)
                           .op(CONNECT, 4).op(CONNECT, 5).poll(3).op(CANCEL, 3).poll(3))
    s['cancel_fd_shutdown'] = (Ops().op(RECV, 1, SOCK_A, u16(10), 0).op(POLL, 2, SOCK_A, 0, 1)
                               .poll(1).op(CANCEL_FD, 0, SOCK_A).op(SHUTDOWN, 3, SOCK_B, 1).poll(4))
    s['stream_echo'] = (Ops().attach(1, 0, 0).op(PEER_WRITE, 0, SOCK_B, u16(300)).poll(3)
                        .op(STREAM_WRITE, 1, u16(1000)).poll(3).op(PEER_READ, 0, SOCK_B)
                        .op(STREAM_SHUTDOWN, 1).poll(2).op(STREAM_CLOSE, 1).poll(3))
    s['stream_pause'] = (Ops().attach(2, 0, FLAG_PAUSED).op(PEER_WRITE, 0, SOCK_B, u16(2000)).poll(2)
                         .op(PAUSE_RESUME, 2, 0).poll(3).op(PAUSE_RESUME, 2, 1)
                         .op(PEER_WRITE, 0, SOCK_B, u16(500)).poll(2).op(PAUSE_RESUME, 2, 0).poll(2)
                         .op(STREAM_ABORT, 2).poll(3))
    s['stream_flow'] = (Ops().attach(3, 0, FLAG_NO_READ | FLAG_CLOSE_FD).op(SET_LIMITS, 3, u16(4000), u16(1000))
                        .op(STREAM_WRITE, 3, u16(60000)).op(STREAM_WRITE, 3, u16(60000)).op(WRITE_SIZE, 3)
                        .poll(2).op(PEER_READ, 0, SOCK_B).poll(2).op(PEER_READ, 0, SOCK_B).poll(2)
                        .op(STREAM_CLOSE, 3).op(STREAM_CLOSE, 3).op(STREAM_ABORT, 3).poll(3))
    s['stream_pipe'] = (Ops().attach(4, 2, FLAG_FILE | FLAG_CLOSE_FD).op(PEER_WRITE, 0, PIPE_W, u16(100))
                        .poll(3).attach(5, 3, FLAG_FILE | FLAG_NO_READ).op(STREAM_WRITE, 5, u16(100))
                        .poll(2).op(STREAM_CLOSE, 4).op(STREAM_CLOSE, 5).poll(4))
    s['stream_dup_token'] = (Ops().attach(6, 0, 0).attach(6, 1, 0).op(NOP, 6).op(TIMEOUT, 7, 255)
                             .attach(7, 1, 0).op(CANCEL, 7).poll(2).attach(7, 1, 0).poll(2)
                             .op(STREAM_ABORT, 6).op(STREAM_ABORT, 7).poll(3).attach(6, 0, 0).poll(1))
    s['splice'] = (Ops().op(SPLICE, 1, 1, u16(0), u16(4096)).poll(2).op(SPLICE, 2, 0, u16(4096))
                   .poll(2).op(PEER_READ, 0, SOCK_B))
    s['close_inflight'] = (Ops().op(CLOSE, 1, SOCK_A).op(RECV, 2, SOCK_A, u16(10), 0).op(CLOSE, 3, PIPE_R)
                           .poll(4).op(CHILD_EXIT, 4, 0).op(CHILD_EXIT, 5, 1).poll(3))
    s['tiny_ring_overflow'] = Ops(sizes=0x00)
    for i in range(60):
        s['tiny_ring_overflow'].op(NOP, i & 15)
    s['tiny_ring_overflow'].poll(6)
    s['ladder_all_off'] = Ops(sizes=0x55, disable=0xff).attach(1, 0, 0).op(PEER_WRITE, 0, SOCK_B, u16(3000)) \
        .op(POLL, 2, PIPE_R, 0, 1).op(ACCEPT, 3, 1).op(CONNECT, 4).poll(4).op(CANCEL, 2).op(CANCEL, 3) \
        .op(STREAM_CLOSE, 1).poll(4)
    s['no_defer_taskrun'] = Ops(sizes=0x95).op(RECV, 1, SOCK_A, u16(10), 0).op(PEER_WRITE, 0, SOCK_B, u16(5)).poll(3)
    # kloop_destroy with reads, a multishot accept, a timeout and a stream
    # with a queued write in flight.
    s['destroy_busy'] = (Ops().op(RECV, 1, SOCK_A, u16(100), 0).op(ACCEPT, 2, 1).op(TIMEOUT, 3, 255)
                         .attach(4, 1, FLAG_NO_READ).op(STREAM_WRITE, 4, u16(60000))
                         .op(STREAM_WRITE, 4, u16(60000)).op(POLL, 5, PIPE_R, 0, 1).op(CONNECT, 6)
                         .poll(1).op(STREAM_CLOSE, 4).op(DESTROY, 0))
    s['destroy_unpolled'] = Ops().op(NOP, 1).op(TIMEOUT, 2, 1).attach(3, 0, FLAG_CLOSE_FD).op(DESTROY, 0)
    # Regressions found by fuzzing (see the commit that added them).
    # A stream with nothing in the kernel (here: read error on a pipe's
    # write end) released its token at close(), before CLOSED.
    s['regress_stream_token_release'] = (Ops().attach(3, 3, 0).poll(2).op(STREAM_CLOSE, 3)
                                         .op(STREAM_CLOSE, 3).op(NOP, 3).poll(3))
    # kloop_cancel of a closing stream answered -EPIPE (not in its contract).
    s['regress_cancel_closing_stream'] = Ops().attach(3, 3, 0).op(STREAM_CLOSE, 3).op(CANCEL, 3).poll(2)
    return {k: bytes(v.b) for k, v in s.items()}


def random_seeds(rng, count, lo, hi):
    return {f'random_{i:02d}': bytes(rng.randrange(256) for _ in range(rng.randrange(lo, hi)))
            for i in range(count)}


def abi_seeds(rng):
    s = {}
    # One step per case of Abi::Step with a live handle and small values.
    for case in range(36):
        body = bytearray()
        for rep in range(3):
            body += bytes([case, rep])
            body += bytes(rng.randrange(256) for _ in range(24))
        s[f'case_{case:02d}'] = bytes(body)
    s.update(random_seeds(rng, 16, 40, 400))
    # Regression: kloop_get_stats with size = offsetof(reserved) wrote the
    # whole struct (heap overflow in the caller).
    s['regress_stats_small_size'] = bytes([28 + 36 * 3, 0x18, 0x18, 0x18])
    return s


def write(target, seeds):
    d = os.path.join(HERE, 'corpus', target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), 'wb') as f:
            f.write(data)


def main():
    rng = random.Random(20250101)
    ops = ops_seeds()
    ops.update(random_seeds(rng, 16, 20, 300))
    write('fuzz_ops', ops)
    write('fuzz_abi', abi_seeds(rng))


if __name__ == '__main__':
    main()
