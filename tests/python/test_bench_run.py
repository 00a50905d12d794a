"""benchmarks/run.py's HTTP cells: the plain-HTTP kind (the server of
`echo_server.py --kind http` without ssl=, under wrk) is measured like the
https kind, and the tiers that should have it do.

The end-to-end test runs the real driver for a short time (1 s per server):
it needs the load generator's build directory (run.py refuses to start
without it) and wrk."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

RUN_PY = os.path.join(ROOT, "benchmarks", "run.py")


def _load_run():
    spec = importlib.util.spec_from_file_location("bench_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


run = _load_run()


def _build_dir():
    """The meson build holding libkloop and the load generator, or None."""
    lib = os.environ.get("KLOOP_LIBRARY")
    candidates = [os.path.dirname(os.path.dirname(lib))] if lib else []
    candidates.append(os.path.join(ROOT, "build"))
    for b in candidates:
        if os.path.exists(os.path.join(b, "benchmarks", "loadgen")):
            return b
    return None


def test_http_tier_cells():
    assert run.tier_cells("http") == [("http", 0, 10), ("http", 0, 100)]
    assert run.tier_cells("http", conns="1,1000") == [("http", 0, 1), ("http", 0, 1000)]


def test_full_tier_has_http():
    full = run.tier_cells("full")
    assert [c for c in full if c[0] == "http"] == [("http", 0, c) for c in (1, 10, 100, 1000)]
    # the echo kinds are still all there
    assert {k for k, _, _ in full} == set(run.KINDS) | {"http"}


def test_custom_http_ignores_sizes():
    cells = run.tier_cells("custom", kinds="http,protocol", sizes="64,1k", conns="10,100")
    assert cells == [("http", 0, 10), ("http", 0, 100),
                     ("protocol", 64, 10), ("protocol", 64, 100),
                     ("protocol", 1024, 10), ("protocol", 1024, 100)]


def test_http_kind_is_a_plain_wrk_kind():
    # wrk is the client of both HTTP kinds; only https is TLS
    assert run.kind_loadgen_args("http") is None
    assert run.kind_loadgen_args("https") is None
    assert run.WRK_KINDS["http"] == "http" and run.WRK_KINDS["https"] == "https"
    assert "http" not in run.TLS_KINDS
    assert run.cell_label("http", 0, 100) == "HTTP keep-alive (wrk), 100 conns"


def test_native_server_refused_for_http():
    rec = run.run_one(None, "epoll", "http", 0, 10, 1, 0)
    assert rec["error"].startswith("n/a:") and "HTTP" in rec["error"]


def test_parse_wrk_plain_output():
    # the lines run.py reads from `wrk --latency` (values made up)
    text = ("Running 4s test @ http://127.0.0.1:40000/\n"
            "  1 threads and 10 connections\n"
            "  Latency Distribution\n"
            "     50%   95.00us\n"
            "     75%  120.00us\n"
            "     90%  150.00us\n"
            "     99%    1.20ms\n"
            "  400000 requests in 4.00s, 40.00MB read\n"
            "Requests/sec: 100000.00\n")
    res = run.parse_wrk(text)
    assert res["requests"] == 400000 and res["duration_s"] == 4.0
    assert res["latency_us"] == {"p50": 95.0, "p75": 120.0, "p90": 150.0, "p99": 1200.0}
    assert res["socket_errors"] == 0 and res["non_2xx"] == 0


def test_docs_have_http_section():
    with open(os.path.join(ROOT, "docs", "performance.md")) as f:
        text = f.read()
    assert "### HTTP keep-alive (wrk)" in text
    begin, end = text.index("<!-- BEGIN http -->"), text.index("<!-- END http -->")
    assert begin < end


@pytest.mark.slow
def test_http_tier_runs(tmp_path):
    """A short real run of the http tier on asyncio and kloop: every run
    served requests with no wrk error, measured like the https kind."""
    build = _build_dir()
    if build is None:
        pytest.skip("the load generator is not built (meson -Dbenchmarks=true); run.py "
                    "needs its build directory")
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    out = tmp_path / "http.json"
    cmd = [sys.executable, RUN_PY, "http", "--build", build, "--loops", "asyncio,kloop",
           "--rounds", "2", "--duration", "1", "--warmup", "0.5",
           "--json-out", str(out), "--allow-stale"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    payload = json.loads(out.read_text())
    runs = payload["runs"]
    # 2 cells x 2 loops x 2 rounds
    assert len(runs) == 8
    assert {(x["kind"], x["conns"]) for x in runs} == {("http", 10), ("http", 100)}
    for x in runs:
        assert "error" not in x, x
        assert x["loadgen_cmd"].startswith(f"wrk -t1 -c{x['conns']} -d1s --latency http://")
        assert x["requests"] > 100 and x["rps"] > 0
        assert x["wrk_socket_errors"] == 0 and x["wrk_non_2xx"] == 0
        assert x["server"]["cpu_us_per_req"] > 0 and x["server"]["rss_kb"] > 0
        assert x["latency_us"]["p50"] > 0 and x["latency_us"]["p99"] >= x["latency_us"]["p50"]
        assert "server_tls" not in x and "tls_path" not in x
    rows = payload["summary"]
    assert [(row["kind"], row["conns"]) for row in rows] == [("http", 10), ("http", 100)]
    for row in rows:
        assert row["ratios"]["kloop/asyncio"]["rps"] > 0
    # the table printed on stdout: both cells, with the server/client shares
    assert "HTTP keep-alive (wrk), 10 conns" in r.stdout
    assert "HTTP keep-alive (wrk), 100 conns" in r.stdout
    assert "kloop: share of a core, server / client" in r.stdout


def test_memory_table_per_further_connection():
    # Growth per connection at each count, and the cost of each connection
    # beyond the first count: (growth at 3000 - growth at 1000) / 2000, per
    # round, median over rounds.
    def rec(rnd, conns, before, after):
        return {"loop": "kloop", "kind": "protocol", "conns": conns, "round": rnd,
                "rss_kb_before": before, "rss_kb_after": after,
                "rss_kb_per_conn": (after - before) / conns}
    recs = [rec(0, 1000, 20000, 22000), rec(0, 3000, 20100, 25100),   # 1.5 KiB
            rec(1, 1000, 20000, 22100), rec(1, 3000, 20000, 25300),   # 1.6 KiB
            {"loop": "uvloop", "kind": "protocol", "conns": 1000, "round": 0,
             "error": "n/a: not installed"}]
    table = run.memory_markdown(recs, [1000, 3000]).splitlines()
    assert table[0].split(" | ")[-1].startswith("KiB per further connection, 1000 → 3000")
    kloop = [c.strip() for c in table[2].strip("|").split("|")]
    assert kloop[0] == "kloop (protocol)"
    assert kloop[2] == "2.05 (2.00–2.10)"      # at 1000
    assert kloop[4] == "1.55 (1.50–1.60)"      # further
    assert table[3].startswith("| uvloop (protocol) | n/a")


def test_ablation_tier_runs_kloop_against_one_switch_each():
    assert run.tier_cells("ablation") == run.ABLATION_CELLS
    # every variant is kloop with exactly one switch in its environment
    for name, (env, what, instead) in run.ABLATIONS.items():
        assert run.LOOP_VARIANTS[name] == ("kloop", env)
        assert len(env) == 1 and what and instead
    assert {e.get("KLOOP_DISABLE") for e, _, _ in run.ABLATIONS.values()} >= {
        "multishot_recv", "buf_ring", "defer_taskrun", "send_gather", "direct_send"}
    assert {"KLOOP_CQ_BATCH": "1"} in [e for e, _, _ in run.ABLATIONS.values()]


def test_ablation_table_gives_ratios_to_full_kloop():
    def rec(loop, rnd, rps, cpu):
        return {"loop": loop, "kind": "protocol", "size": 1024, "conns": 10, "round": rnd,
                "rps": rps, "server": {"cpu_us_per_req": cpu, "user_us_per_req": 1.0,
                                       "sys_us_per_req": cpu - 1.0, "util": 1.0},
                "client": {"util": 0.5}, "latency_us": {"p50": 40, "p99": 90},
                "other_cpu": 0.0}
    recs = [rec("kloop", 0, 200000, 5.0), rec("kloop-no-batch", 0, 100000, 10.0),
            rec("kloop", 1, 200000, 5.0), rec("kloop-no-batch", 1, 120000, 8.0)]
    cells = [("protocol", 1024, 10)]
    pairs = [("kloop-no-batch", "kloop")]
    rows = run.summarize(recs, cells, ["kloop", "kloop-no-batch"], pairs)
    table = run.ablation_markdown(rows, pairs).splitlines()
    row = [c.strip() for c in table[2].strip("|").split("|")]
    assert row[0] == "completion batching (`kloop-no-batch`)"
    # req/s 0.5x and 0.6x of kloop's in the two rounds; CPU 2.0x and 1.6x
    assert row[2] == "0.55× (0.50–0.60), 1.80×"


# --- charts (run.py --chart, and the chart --doc links from its section) ---

needs_matplotlib = pytest.mark.skipif(
    not run.have_matplotlib(),
    reason="matplotlib is not installed (Debian package python3-matplotlib; "
           "scripts/setup.sh installs it)")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_payload(tier="quick", section=None):
    """A matrix run as run.py saves it: two cells, three loops, three rounds
    (made-up figures), summarized by run.summarize like a real run."""
    def rec(loop, cell, rnd, rps):
        kind, size, conns = cell
        return {"loop": loop, "kind": kind, "size": size, "conns": conns, "round": rnd,
                "rps": rps, "server": {"cpu_us_per_req": 1e6 / rps, "user_us_per_req": 1.0,
                                       "sys_us_per_req": 1e6 / rps - 1.0, "util": 0.99},
                "client": {"util": 0.8}, "latency_us": {"p50": 40, "p99": 90},
                "other_cpu": 0.0, "steal": 0.0}
    cells = [("protocol", 1024, 10), ("streams", 1024, 10)]
    base = {"asyncio": 30000, "uvloop": 110000, "kloop": 100000}
    records = [rec(loop, cell, rnd, rps * (1 + 0.02 * rnd) * (1 - 0.1 * i))
               for rnd in range(3) for i, cell in enumerate(cells)
               for loop, rps in base.items()]
    loops = list(base)
    pairs = [("kloop", "uvloop"), ("kloop", "asyncio")]
    meta = {"date": "2026-11-21T12:00:00+00:00", "kernel": "6.18", "cpu": "test CPU",
            "cpus": 2, "python": "3.11.2", "uvloop": "0.17.0", "liburing": "2.3",
            "commit": "abc1234", "loadavg_start": [0.1, 0.1, 0.1], "nice": 0,
            "command": f"/usr/bin/python3 benchmarks/run.py {tier}"}
    return {"tier": tier, "section": section, "meta": meta, "rounds": 3, "duration": 4.0,
            "warmup": 1.0, "pipeline": 1, "loadgen_extra": [], "runs": records,
            "summary": run.summarize(records, cells, loops, pairs)}, loops, pairs


@needs_matplotlib
def test_chart_png_draws_the_ratios(tmp_path):
    payload, _, _ = _synthetic_payload()
    assert set(payload["summary"][0]["ratios"]) == {"kloop/uvloop", "kloop/asyncio"}
    out = tmp_path / "quick.png"
    assert run.chart_png(payload, out) == out
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    # IHDR: width, height; a landscape chart with room for bars, labels, legend
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 300
    assert len(data) > 10000


@needs_matplotlib
def test_chart_png_other_ratio_names_and_none_without_ratios(tmp_path):
    # ablation: each variant against kloop; the keys are whatever summarize made
    payload, _, _ = _synthetic_payload(tier="ablation")
    records = payload["runs"]
    cells = [("protocol", 1024, 10), ("streams", 1024, 10)]
    payload["summary"] = run.summarize(records, cells, ["kloop", "uvloop"], [("uvloop", "kloop")])
    out = tmp_path / "ablation.png"
    assert run.chart_png(payload, out) == out and out.read_bytes()[:8] == PNG_MAGIC
    # one loop only: nothing to compare, no file
    payload["summary"] = run.summarize(records, cells, ["kloop"], [])
    assert run.chart_png(payload, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


@needs_matplotlib
def test_chart_png_many_cells(tmp_path):
    # the full tier's 100 cells: labels turned upright, the figure wider
    payload, _, _ = _synthetic_payload(tier="full")
    row = payload["summary"][0]
    payload["summary"] = [dict(row, conns=c) for c in range(1, 41)]
    small = tmp_path / "small.png"
    run.chart_png(_synthetic_payload()[0], small)
    out = tmp_path / "full.png"
    assert run.chart_png(payload, out) == out
    data, small = out.read_bytes(), small.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert int.from_bytes(data[16:20], "big") > 2 * int.from_bytes(small[16:20], "big")


def test_doc_body_has_the_image_line_between_command_and_tables():
    payload, loops, pairs = _synthetic_payload(tier="custom", section="udp-readline")
    tables = run.markdown_tables(payload["summary"], loops, pairs)
    body = run.matrix_doc_body(payload, tables, [], "", image="img/perf-udp-readline.png")
    lines = body.splitlines()
    img = [i for i, ln in enumerate(lines) if ln.startswith("![")]
    assert len(img) == 1 and lines[img[0]].endswith("](img/perf-udp-readline.png)")
    command = lines.index("`/usr/bin/python3 benchmarks/run.py custom`")
    assert command < img[0] < lines.index(tables.splitlines()[0])
    assert "![" not in run.matrix_doc_body(payload, tables, [], "")


def _doc_with_section(tmp_path, name):
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nbefore\n\n<!-- BEGIN {name} -->\nold\n"
                   f"<!-- END {name} -->\n\nafter\n")
    return doc


def _section(doc, name):
    text = doc.read_text()
    assert text.startswith("# Performance\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    return text.split(f"<!-- BEGIN {name} -->", 1)[1].split(f"<!-- END {name} -->", 1)[0]


@needs_matplotlib
def test_doc_writes_the_chart_and_links_it_in_the_section(tmp_path, capsys):
    payload, loops, pairs = _synthetic_payload(tier="http", section=None)
    doc = _doc_with_section(tmp_path, "http")
    chart = tmp_path / "chart.png"
    run.emit_matrix(payload, loops, pairs, [], True, chart=str(chart), doc_path=doc)
    img = tmp_path / "img" / "perf-http.png"
    assert img.read_bytes()[:8] == PNG_MAGIC and chart.read_bytes()[:8] == PNG_MAGIC
    section = _section(doc, "http")
    assert "old" not in section
    assert "](img/perf-http.png)\n" in section and section.count("![") == 1
    assert "| cell |" in section


def test_doc_without_matplotlib_goes_on_without_the_chart(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "have_matplotlib", lambda: False)
    payload, loops, pairs = _synthetic_payload()
    doc = _doc_with_section(tmp_path, "quick")
    chart = tmp_path / "chart.png"
    run.emit_matrix(payload, loops, pairs, [], True, chart=str(chart), doc_path=doc)
    section = _section(doc, "quick")
    assert "| cell |" in section and "![" not in section
    assert not chart.exists() and not (tmp_path / "img").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install python3-matplotlib" in err[0]


@needs_matplotlib
def test_report_redraws_the_chart_from_saved_results(tmp_path, capsys):
    payload, _, _ = _synthetic_payload()
    saved = tmp_path / "quick.json"
    saved.write_text(json.dumps(payload))
    chart = tmp_path / "again.png"
    assert run.main(["report", str(saved), "--chart", str(chart)]) == 0
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert "Protocol, 1 KiB, 10 conns" in capsys.readouterr().out


def test_chart_refused_for_tiers_without_cells(tmp_path):
    with pytest.raises(SystemExit) as e:
        run.main(["micro", "--chart", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert set(run.MATRIX_TIERS) == {"quick", "full", "custom", "tls", "http", "churn",
                                     "native", "ablation"}


def test_disturbed_runs_include_time_stolen_by_the_hypervisor():
    assert run.disturbance({"other_cpu": 0.02, "steal": 0.01}, 0.10) is None
    assert run.disturbance({"other_cpu": 0.30, "steal": 0.0}, 0.10) == \
        "other processes used 30% of a core"
    assert run.disturbance({"other_cpu": 0.0, "steal": 1.39}, 0.10) == \
        "the hypervisor stole 139% of a core"
    assert run.disturbance({"other_cpu": 0.2, "steal": 0.5}, 0.10) == \
        "other processes used 20% of a core and the hypervisor stole 50% of a core"
    assert run.disturbance({"error": "x", "other_cpu": 0.9, "steal": 0.9}, 0.10) is None


def test_a_run_disturbed_by_steal_is_run_again(monkeypatch):
    """run_matrix repeats a run the hypervisor disturbed and keeps the last."""
    steals = iter([0.8, 0.5, 0.0])
    calls = []

    def fake_run_one(env, loop, kind, size, conns, *rest):
        calls.append(loop)
        return {"loop": loop, "rps": 1.0, "other_cpu": 0.0, "steal": next(steals)}

    class Env:
        def availability(self, loop):
            return None

    monkeypatch.setattr(run, "run_one", fake_run_one)
    recs = run.run_matrix(Env(), [("protocol", 1024, 10)], ["kloop"], 1, 1.0, 0.0, retries=2)
    assert calls == ["kloop"] * 3
    assert [(r["attempt"], r["steal"]) for r in recs] == [(2, 0.0)]


def test_profile_table_keeps_libc_and_libcrypto_apart():
    rec = {"loop": "kloop", "kind": "tls13", "python_calls_per_request": 16.8,
           "perf_dso_shares": {"libcrypto.so.3": 44.11, "[kernel.kallsyms]": 24.94,
                               "libc.so.6": 18.24, "python3.11": 6.1, "libssl.so.3": 4.07,
                               "libkloop.so.0.1.0": 1.9, "liburing.so.2.3": 0.64,
                               "loop.cpython-311-x86_64-linux-gnu.so": 0.0}}
    head, _, row = run.profile_markdown([rec]).splitlines()
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")],
                     [c.strip() for c in row.strip("|").split("|")]))
    assert cells["libc"] == "18 %" and cells["libcrypto"] == "44 %"
    assert cells["libssl"] == "4 %" and cells["kernel"] == "25 %"
    assert cells["libkloop"] == "2 %" and cells["python3"] == "6 %"
    assert cells["other"] == "1 %"   # liburing
    assert cells["Python calls/req"] == "16.8"
