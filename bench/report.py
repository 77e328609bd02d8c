"""Print the benchmark figures as markdown tables, with ratios against ProcessPoolExecutor(2).

    python bench/report.py bench/results.json

Reads the JSON written by ``pytest --benchmark-json``; the figures come from each benchmark's
``extra_info`` (filled by ``bench/harness.py``). The two targets are checked at the end:
embedq's p50 latency in ``process`` durability at most 2x ProcessPoolExecutor's (from the case
that alternates blocks of both, so the VM's drift does not move the ratio), and embedq's
``delay()`` throughput in ``fsync`` durability at least ProcessPoolExecutor's.
"""

import json
import sys

PPE = "ProcessPoolExecutor(2)"
ZMQ_FLOOR = "ZeroMQ floor (bare ROUTER broker + echo worker)"
#: Latency target: embedq p50 / PPE p50 (process durability).
LATENCY_TARGET = 2.0
#: Throughput target: embedq delay() tasks/s / PPE tasks/s (fsync durability).
THROUGHPUT_TARGET = 1.0


def load(path):
    with open(path) as handle:
        data = json.load(handle)
    rows = [b["extra_info"] | {"test": b["name"]} for b in data["benchmarks"] if b.get("extra_info")]
    return data, rows


def _fmt(value, digits=0):
    return f"{value:,.{digits}f}"


def _load(row):
    """1-minute load average when the case finished (2 CPUs: above ~2 means others were busy too)."""
    value = row.get("loadavg_1m")
    return "-" if value is None else f"{value:.1f}"


def _table(rows, kind, header, cells):
    """(markdown lines, the rows of ``kind``): a header, then ``cells(row)`` for each row."""
    rows = [r for r in rows if r["kind"] == kind]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return lines, rows


def _base(rows, system):
    return next((r for r in rows if r["system"] == system), None)


def _ratio(value, base, digits=2):
    return f"{value / base:.{digits}f}x" if base else "-"


def latency_table(rows):
    base = _base([r for r in rows if r["kind"] == "latency"], PPE) or {}
    lines, rows = _table(
        rows, "latency",
        ["Round trip of one no-op task", "p50 (µs)", "p99 (µs)", "mean (µs)", "p50 vs PPE", "p99 vs PPE", "load"],
        lambda r: [r["label"], _fmt(r["p50_us"]), _fmt(r["p99_us"]), _fmt(r["mean_us"]),
                   _ratio(r["p50_us"], base.get("p50_us")), _ratio(r["p99_us"], base.get("p99_us")), _load(r)])
    return lines, rows, base or None


def interleaved_table(rows):
    lines, rows = _table(
        rows, "latency_interleaved",
        ["Round trip, in alternating blocks with PPE", "trips each", "p50 (µs)", "PPE p50 (µs)", "p50 vs PPE",
         "p99 (µs)", "PPE p99 (µs)", "load"],
        lambda r: [r["label"], _fmt(r["trips"]), _fmt(r["p50_us"]), _fmt(r["baseline_p50_us"]),
                   _ratio(r["p50_us"], r["baseline_p50_us"]), _fmt(r["p99_us"]), _fmt(r["baseline_p99_us"]),
                   _load(r)])
    return (lines if rows else []), rows


def throughput_table(rows):
    base = _base([r for r in rows if r["kind"] == "throughput"], PPE) or {}
    lines, rows = _table(
        rows, "throughput",
        ["Throughput, no-op tasks", "tasks", "rounds", "tasks/s (median)", "tasks/s (best)", "vs PPE (median)",
         "load"],
        lambda r: [r["label"], _fmt(r["tasks"]), str(r["rounds"]), _fmt(r["tasks_per_s"]),
                   _fmt(r["best_tasks_per_s"]), _ratio(r["tasks_per_s"], base.get("tasks_per_s")), _load(r)])
    return lines, rows, base or None


def lateness_table(rows):
    lines, rows = _table(
        rows, "lateness",
        ["Scheduled tasks: start after due time", "tasks", "p50 (ms)", "p99 (ms)", "max (ms)", "load"],
        lambda r: [r["label"], _fmt(r["tasks"]), f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", f"{r['max_ms']:.2f}",
                   _load(r)])
    return lines if rows else []


def fanout_table(rows):
    base = _base([r for r in rows if r["kind"] == "fanout"], "multiprocessing.Pool(2)") or {}
    lines, rows = _table(
        rows, "fanout",
        ["Fan-out", "tasks", "seconds (median of 3)", "tasks/s", "vs Pool.map", "load"],
        lambda r: [r["label"], _fmt(r["tasks"]), f"{r['seconds']:.3f}", _fmt(r["tasks_per_s"]),
                   _ratio(r["seconds"], base.get("seconds"), 1), _load(r)])
    return lines if rows else []


def targets(latency, lat_base, interleaved, throughput, tp_base):
    """The latency ratio from the interleaved case when there is one (same VM conditions for
    both), else from the separate cases."""
    lines = []
    if interleaved:
        pairs = [(r, r["p50_us"] / r["baseline_p50_us"], "in alternating blocks") for r in interleaved]
    else:
        pairs = [(r, r["p50_us"] / lat_base["p50_us"], "separate cases") for r in latency
                 if r["system"] == "embedq" and lat_base and "delay()" in r["label"]]
    for r, ratio, how in pairs:
        goal = (f"target <= {LATENCY_TARGET:.0f}x: {'met' if ratio <= LATENCY_TARGET else 'NOT met'}"
                if r["durability"] == "process" else "reported beside it")
        lines.append(f"- p50 latency, embedq `delay().get()` [{r['durability']}] / PPE ({how}) = "
                     f"**{ratio:.2f}x** ({goal})")
    for r in throughput:
        if r["system"] == "embedq" and tp_base and "delay()" in r["label"] and r["durability"] == "fsync":
            ratio = r["tasks_per_s"] / tp_base["tasks_per_s"]
            goal = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
            lines.append(f"- throughput, {r['label']} / PPE = **{ratio:.2f}x** "
                         f"(target >= {THROUGHPUT_TARGET:.0f}x: {goal})")
    return lines


def ceilings(latency, lat_base, throughput, tp_base):
    """What bounds each target in this run (bench/ceilings.py measures the same in one go): the
    bare ZeroMQ floor's share of the latency budget, and ``delay()`` with no flush at all."""
    lines = []
    floor = _base(latency, ZMQ_FLOOR)
    ours = next((r for r in latency if r["system"] == "embedq" and r["durability"] == "process"
                 and "delay()" in r["label"]), None)
    if floor and ours and lat_base:
        wire, work = floor["p50_us"] / lat_base["p50_us"], (ours["p50_us"] - floor["p50_us"]) / lat_base["p50_us"]
        lines.append(f"- latency: the bare ZeroMQ floor (the same four hops, no work) is {wire:.2f}x PPE, "
                     f"leaving {LATENCY_TARGET - wire:.2f}x of the target for embedq's own work, which "
                     f"took {work:.2f}x (separate cases)")
    for r in throughput:
        if r["system"] == "embedq" and tp_base and "delay()" in r["label"] and r["durability"] == "process":
            lines.append(f"- throughput with no flush at all, {r['label']}: "
                         f"{r['tasks_per_s'] / tp_base['tasks_per_s']:.2f}x PPE, above any `fsync` figure")
    return ["", "What bounds them in this run:", "", *lines] if lines else []


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    data, rows = load(argv[0])
    machine = data.get("machine_info", {})
    commit = data.get("commit_info", {})
    lat_lines, latency, lat_base = latency_table(rows)
    mixed_lines, interleaved = interleaved_table(rows)
    tp_lines, throughput, tp_base = throughput_table(rows)
    out = [f"Run {data.get('datetime', '?')}, Python {machine.get('python_version', '?')}, "
           f"{machine.get('cpu', {}).get('count', '?')} CPUs "
           f"({machine.get('cpu', {}).get('brand_raw', '?')}), commit {str(commit.get('id', '?'))[:10]}"
           f"{' (dirty)' if commit.get('dirty') else ''}.", "", *lat_lines, "", *mixed_lines, "", *tp_lines, "",
           *lateness_table(rows), "", *fanout_table(rows), "",
           "Targets (ratios against ProcessPoolExecutor(2) in this run):", "",
           *targets(latency, lat_base, interleaved, throughput, tp_base),
           *ceilings(latency, lat_base, throughput, tp_base)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
