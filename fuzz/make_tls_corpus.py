#!/usr/bin/python3
"""Write the seed inputs of fuzz_tls_frame, fuzz_tls_stream and fuzz_tls_open
(run once).

The TLS handshake bytes are real: a client and a server (Python's ssl module
over memory BIOs, with a throw-away self-signed certificate made by the
openssl command) handshake with each other and each flight is captured.
Nothing is downloaded. The seeds are written as seed_* files; the inputs the
fuzzers found are kept beside them. Run from anywhere:
./fuzz/make_tls_corpus.py
"""
import os
import ssl
import struct
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------
# fuzz_tls_stream: byte 0 options, byte 1 k, k piece sizes, peer bytes
SERVER, PAUSED, EARLY_WRITE, CLOSE, ABORT_EARLY = 1, 2, 4, 8, 16
VERIFY = 0x80


def stream_input(opt, data, sizes=()):
    assert len(sizes) < 8
    return bytes([opt, len(sizes)]) + bytes(sizes) + data


def identity(tmp):
    key, cert = os.path.join(tmp, 'key.pem'), os.path.join(tmp, 'cert.pem')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                    'ec_paramgen_curve:P-256', '-nodes', '-subj', '/CN=localhost',
                    '-days', '1', '-keyout', key, '-out', cert],
                   check=True, capture_output=True)
    return key, cert


def flights(key, cert, version):
    """The flights of one in-memory handshake: [(sender, bytes), ...]."""
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    for c in (sctx, cctx):
        c.minimum_version = c.maximum_version = version
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    cli = cctx.wrap_bio(cin, cout, server_side=False, server_hostname='localhost')
    srv = sctx.wrap_bio(sin, sout, server_side=True)
    out = []
    done = {'client': False, 'server': False}
    for _ in range(10):
        for name, obj, mine, other in (('client', cli, cout, sin), ('server', srv, sout, cin)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            b = mine.read()
            if b:
                out.append((name, b))
                other.write(b)
        if all(done.values()):
            break
    # some application data and the client's close_notify after it
    cli.write(b'GET / HTTP/1.1\r\nHost: localhost\r\n\r\n')
    out.append(('client', cout.read()))
    srv.write(b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n')
    out.append(('server', sout.read()))
    return out


def record(ctype, payload, version=0x0303):
    return struct.pack('>BHH', ctype, version, len(payload)) + payload


def stream_seeds(key, cert):
    s = {}
    f13 = flights(key, cert, ssl.TLSVersion.TLSv1_3)
    f12 = flights(key, cert, ssl.TLSVersion.TLSv1_2)
    ch13 = f13[0][1]
    ch12 = f12[0][1]
    client13 = b''.join(b for who, b in f13 if who == 'client')
    client12 = b''.join(b for who, b in f12 if who == 'client')
    server13 = b''.join(b for who, b in f13 if who == 'server')
    server12 = b''.join(b for who, b in f12 if who == 'server')
    # To the engine as server: what a client sends.
    s['client_hello_13'] = stream_input(SERVER, ch13)
    s['client_hello_12'] = stream_input(SERVER, ch12)
    s['client_hello_13_bytewise'] = stream_input(SERVER, ch13[:64], (1,))
    s['client_hello_13_header_split'] = stream_input(SERVER, ch13, (3, 2, 100))
    s['client_hello_truncated'] = stream_input(SERVER, ch13[:len(ch13) // 2])
    s['client_hello_header_only'] = stream_input(SERVER, ch13[:5])
    s['client_flights_13'] = stream_input(SERVER, client13, (0,))
    s['client_flights_12'] = stream_input(SERVER, client12, (0,))
    s['client_hello_paused_early_write'] = stream_input(SERVER | PAUSED | EARLY_WRITE, ch13)
    s['client_hello_close'] = stream_input(SERVER | CLOSE, ch13)
    s['client_hello_abort_early'] = stream_input(SERVER | ABORT_EARLY | (1 << 5), ch13, (40,))
    # To the engine as client: what a server sends (not for its ClientHello,
    # so a TLS 1.3 flight fails to decrypt; a TLS 1.2 one gets further).
    s['server_flight_13'] = stream_input(0, server13, (0,))
    s['server_flight_12'] = stream_input(0, server12, (0,))
    s['server_flight_12_verify'] = stream_input(VERIFY, server12, (0,))
    s['server_hello_12_only'] = stream_input(0, f12[1][1][:len(f12[1][1]) // 3])
    # Records no peer should send.
    big = record(22, b'\x01' + b'\x00' * 16384)  # 2^14+1 bytes announced
    s['record_2p14_plus_1_server'] = stream_input(SERVER, big[:5] + b'\x01\x00\x00' + bytes(64))
    s['record_2p14_plus_1_client'] = stream_input(0, big, (0,))
    s['record_len_max'] = stream_input(SERVER, struct.pack('>BHH', 22, 0x0301, 0xffff) + bytes(32))
    alert = record(21, b'\x02\x28')  # fatal handshake_failure
    s['alert_to_server'] = stream_input(SERVER, alert)
    s['alert_to_client'] = stream_input(0, alert)
    s['close_notify_to_client'] = stream_input(0, record(21, b'\x01\x00'))
    s['alert_after_hello'] = stream_input(SERVER, ch13 + alert)
    s['ccs_first'] = stream_input(SERVER, record(20, b'\x01') + ch13)
    s['appdata_first'] = stream_input(0, record(23, b'hello'))
    s['heartbeat'] = stream_input(SERVER, record(24, b'\x01\x40\x00'))
    s['empty_record'] = stream_input(SERVER, record(22, b'') * 4)
    s['sslv2_hello'] = stream_input(SERVER, bytes.fromhex('802b0103010012000000100100800700c0030080'
                                                          '060040040080020080') + bytes(16))
    s['http_request'] = stream_input(SERVER, b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
    s['garbage'] = stream_input(SERVER, bytes((i * 131 + 7) & 0xff for i in range(200)), (17,))
    s['garbage_client'] = stream_input(0, bytes((i * 97 + 3) & 0xff for i in range(200)))
    s['peer_closes_at_once_server'] = stream_input(SERVER, b'')
    s['peer_closes_at_once_client'] = stream_input(0, b'')
    return s


# --------------------------------------------------------------------------
# fuzz_tls_frame: byte 0 bit 0 = RecordQueue part, else cmsg part

def frame_seeds():
    s = {}

    def q(*steps):
        return bytes([1]) + b''.join(steps)

    # push: op%5 in (0, 1); op&0x80 = NULL payload. 0x82 % 5 == 0.
    def push(ctype, length=None, table=None, seed=0x55, null=False):
        if table is not None:  # kPushLens index (17 entries): a selector with
            # the high bit whose value % 17 is the index
            v = next(x for x in range(0x80, 0x100) if x % 17 == table)
            sel = bytes([v])
        elif length < 0x40:
            sel = bytes([length])
        else:
            sel = bytes([0x40]) + struct.pack('<H', length)
        return bytes([0x82 if null else 0, ctype]) + sel + bytes([seed])

    def read(n):  # op 2; small, or 0x40 + u16
        return bytes([2]) + (bytes([n]) if n < 0x40 else bytes([0x40]) + struct.pack('<H', n))

    drain1 = bytes([4])   # the first record one byte at a time
    clear = bytes([0x86])  # 134 % 5 == 4, high bit set
    s['push_16384_read_exact'] = q(push(23, 16384), read(16389))
    s['push_16384_bytewise'] = q(push(22, 16384), drain1)
    s['push_16385_inner_plaintext'] = q(push(23, 16385), read(16390))
    s['push_16386_refused'] = q(push(22, 16386), read(5), push(21, 2), read(7))
    s['push_boundaries'] = q(*(push(22, table=i) for i in range(17)), read(100), read(16389))
    s['alert_handshake_1byte_reads'] = q(push(21, 2), push(22, 4), drain1, drain1, read(1))
    s['reads_crossing_records'] = q(push(21, 2), push(22, 4), read(3), read(3), read(3), read(9))
    s['empty_record'] = q(push(22, 0), read(1), read(4), read(16))
    s['null_payload'] = q(push(21, 5, null=True), push(21, 0, null=True), read(5), read(1))
    s['clear_mid_record'] = q(push(22, 300), push(21, 2), read(10), clear, read(10), push(21, 2),
                              read(7))
    s['read_empty'] = q(read(1), read(0), read(16389))
    s['many_small'] = q(*(push(20 + i % 5, i % 40, seed=i) for i in range(60)),
                        *(read(i % 7) for i in range(60)))

    # cmsg part: [count][msgs][cut]; kind&3: 0 TLS type, 1 other level, 2/3 raw
    def tls(ctype):
        return bytes([0, ctype])

    def other(dlen, level_idx=1, type_idx=0):
        return bytes([1, dlen - 1, level_idx, type_idx]) + bytes(dlen)

    def raw(length_sel, tls_level=True, tls_type=True, level_idx=0, type_idx=0, data=b''):
        kind = 2 | (4 if tls_level else 0) | (8 if tls_type else 0)
        b = bytes([kind, length_sel])
        if not tls_level:
            b += bytes([level_idx])
        if not tls_type:
            b += bytes([type_idx])
        return b + bytes([len(data)]) + data

    def c(*msgs, cut=0):
        return bytes([0, len(msgs)]) + b''.join(msgs) + bytes([cut])

    s['cmsg_none'] = c()
    s['cmsg_alert'] = c(tls(21))
    s['cmsg_handshake'] = c(tls(22))
    s['cmsg_appdata'] = c(tls(23))
    s['cmsg_two_last_wins'] = c(tls(22), tls(21))
    s['cmsg_other_then_tls'] = c(other(4), tls(21))
    s['cmsg_tls_then_other'] = c(tls(21), other(12, 2, 1))
    s['cmsg_cut_after_first'] = c(tls(22), tls(21), cut=1 | (0 << 2))
    s['cmsg_cut_inside_header'] = c(tls(21), cut=2 | (10 << 2))
    s['cmsg_cut_inside_second'] = c(tls(22), tls(21), cut=3 | (5 << 2))
    s['cmsg_len_huge'] = c(raw(0x80 | 15, data=b'\x15'))
    s['cmsg_len_short'] = c(raw(15, data=b'\x15'), tls(21))
    s['cmsg_len_zero'] = c(raw(0), tls(21))
    # a header announcing one data byte in a control buffer that ends with
    # the header (msg_controllen 16)
    s['cmsg_len_past_controllen'] = c(raw(17), cut=2 | (16 << 2))
    # the same for a second message whose header ends the buffer
    s['cmsg_second_len_past_controllen'] = c(tls(22), raw(17))
    s['cmsg_other_len_long'] = c(raw(200, tls_level=False, level_idx=1, data=bytes(8)), tls(21))
    return s


# --------------------------------------------------------------------------
# fuzz_tls_open: byte 0 options (bit 0 engine serves, bits 1-2 suite, bit 3
# close), then operations (see fuzz_tls_open.cc)
OPEN_SUITES = ('tls13_aes', 'tls13_chacha', 'tls12_aes', 'tls12_chacha')


def open_seeds():
    def write(n):
        return bytes([0]) + struct.pack('<H', n - 1)

    def send(piece=0):
        return bytes([4, piece])

    def flip(at, x):
        return bytes([2]) + struct.pack('<H', at) + bytes([x])

    def insert(at, data):
        return bytes([3, len(data)]) + struct.pack('<H', at) + data

    key_update, close_notify = bytes([1, 1]), bytes([6])
    s = {}
    for i, suite in enumerate(OPEN_SUITES):
        for serves in (0, 1):
            opt = serves | i << 1
            role = 'serves' if serves else 'connects'
            s[f'{suite}_{role}_clean'] = (
                bytes([opt | 8]) + write(1000) + send(7) + write(16384) + key_update +
                write(300) + bytes([7, 50]) + send(0) + close_notify + send(3))
            s[f'{suite}_{role}_flip'] = bytes([opt]) + write(1000) + flip(10, 0x20) + send(0)
            s[f'{suite}_{role}_header_inserted'] = (
                bytes([opt]) + write(1000) + insert(0, b'\x17\x03\x03\x00\x05') + send(1))
            s[f'{suite}_{role}_tail_dropped'] = (
                bytes([opt]) + write(5000) + bytes([5, 10]) + write(10) + send(100))
    return s


def write(target, seeds):
    d = os.path.join(HERE, 'corpus', target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, 'seed_' + name), 'wb') as f:
            f.write(data)
    print(f'{target}: {len(seeds)} seeds')


def main():
    with tempfile.TemporaryDirectory() as tmp:
        key, cert = identity(tmp)
        write('fuzz_tls_stream', stream_seeds(key, cert))
    write('fuzz_tls_frame', frame_seeds())
    write('fuzz_tls_open', open_seeds())


if __name__ == '__main__':
    main()
