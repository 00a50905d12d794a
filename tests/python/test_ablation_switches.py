"""The switches benchmarks/run.py's ablation tier measures kloop with:
KLOOP_DISABLE (capabilities treated as absent, "send_gather",
"direct_send", "tls_seal" and "tls_send_after_wait") and
KLOOP_CQ_BATCH (completion records per poll). Each must really change what
the engine does, leave the loop correct, and refuse what it does not know."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = r"""
import asyncio, json, socket, kloop

async def main():
    loop = asyncio.get_running_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t

        def data_received(self, d):
            # two pieces per answer: what send gathering joins
            self.t.write(d[:1])
            self.t.write(d[1:])

    srv = await loop.create_server(Echo, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    before = loop.get_stats()
    msg = bytes(range(256)) * 300
    for _ in range(20):
        w.write(msg)
        assert await r.readexactly(len(msg)) == msg
    after = loop.get_stats()
    w.close()
    await w.wait_closed()
    srv.close()
    await srv.wait_closed()
    p = loop._proactor
    print(json.dumps({"enabled": p.caps()["enabled"], "cq_len": p._cq_len,
                      "sqes": after["sqes"] - before["sqes"],
                      "direct_sends": after["direct_sends"] - before["direct_sends"],
                      "polls": after["polls"] - before["polls"]}))

kloop.run(main())
"""


def _probe(**env):
    full = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    full.pop("KLOOP_DISABLE", None)
    full.pop("KLOOP_CQ_BATCH", None)
    full.update(env)
    r = subprocess.run([sys.executable, "-c", PROBE], env=full, capture_output=True,
                       text=True, timeout=60)
    return r


def _result(**env):
    import json
    r = _probe(**env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_disable_turns_capabilities_off_and_the_loop_still_echoes():
    base = _result()
    assert {"multishot_recv", "buf_ring", "defer_taskrun"} <= set(base["enabled"])
    off = _result(KLOOP_DISABLE="multishot_recv, buf_ring,defer_taskrun")
    assert not {"multishot_recv", "buf_ring", "defer_taskrun"} & set(off["enabled"])
    # the rest stays as it was, but for what needs the buffer ring (bundled
    # receives, incremental buffers)
    gone = {"multishot_recv", "buf_ring", "defer_taskrun", "recv_bundle", "buf_ring_inc"}
    assert set(off["enabled"]) == set(base["enabled"]) - gone


def test_no_send_gather_costs_sends():
    base = _result()
    off = _result(KLOOP_DISABLE="send_gather")
    assert off["enabled"] == base["enabled"]
    # Each answer is written in two pieces and, gathered, leaves in one send;
    # without gathering the echo needs more submissions.
    assert off["sqes"] > base["sqes"], (base, off)


def test_no_direct_send_queues_every_write():
    # The client's 75 KiB writes find its stream idle: sent at once, unless
    # switched off.
    base = _result()
    off = _result(KLOOP_DISABLE="direct_send")
    assert off["enabled"] == base["enabled"]
    assert base["direct_sends"] > 0, base
    assert off["direct_sends"] == 0, off


def test_tls_switches_set_their_engine_flags():
    # What they change is proven by the engine's tests (tests/engine/
    # test_tls.cc: OpenSslEncrypts/*, AfterAWaitAnAnswerLeaves...); here:
    # each name reaches kloop_config.flags, and only its own bit.
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from kloop import _ffi, _proactor
    for name, flag in (("tls_seal", _ffi.CONFIG_NO_TLS_SEAL),
                       ("tls_send_after_wait", _ffi.CONFIG_NO_TLS_SEND_AFTER_WAIT)):
        config, _ = _proactor._config_from_env({"KLOOP_DISABLE": name})
        assert config == {"disable": 0, "flags": flag}, (name, config)


def test_cq_batch_sets_records_per_poll():
    assert _result()["cq_len"] == 256
    one = _result(KLOOP_CQ_BATCH="1")
    assert one["cq_len"] == 1


@pytest.mark.parametrize("env,needle", [
    ({"KLOOP_DISABLE": "multishot_recv,warp_drive"}, "KLOOP_DISABLE: unknown feature 'warp_drive'"),
    ({"KLOOP_CQ_BATCH": "0"}, "KLOOP_CQ_BATCH must be a whole number from 1 to 65536"),
    ({"KLOOP_CQ_BATCH": "many"}, "KLOOP_CQ_BATCH must be a whole number from 1 to 65536"),
])
def test_bad_switch_values_are_refused_by_name(env, needle):
    r = _probe(**env)
    assert r.returncode != 0
    assert "ValueError" in r.stderr and needle in r.stderr, r.stderr
