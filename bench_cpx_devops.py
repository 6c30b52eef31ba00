#!/usr/bin/env python3
"""Developer tools of cpx_devops, kept out of the tool and its tests. Standard library only.

  python3 bench_cpx_devops.py bench [--quick] [--only TEXT]   docs/performance.md's tables: start-up and
                                                             yardsticks (--only startup), serve (--only
                                                             serve), sick fleets, one shard against the
                                                             whole fleet (--only sharding); asserts nothing
  python3 bench_cpx_devops.py readme                         rewrite the README's example outputs
                                                             from a seeded simulator
"""

import glob
import json
import os
import re
import subprocess
import sys
import time

import cpx_devops as cpx
from test_cpx_devops import CLI, HERE, cli_env, finish, run_readme_command, start_simulator_process

# ---------------------------------------------------------------------------
# Benchmark (make bench): prints, asserts nothing
# ---------------------------------------------------------------------------

class BenchShape:
    """One row of the benchmark: a simulated fleet, the command run against it, and how often."""

    def __init__(self, label, size, latency_ms=20, simulator=(), command=("services", "-o", "json"),
                 sickness=None, repeats=5, fixed=(128, 64, 32, 5, 1)):
        self.label, self.size, self.latency_ms = label, size, latency_ms
        sickness = self.sickness = sickness or cpx.Sickness()
        self.simulator = list(simulator) + ["--fail-fraction", str(sickness.fail_fraction),
                                            "--hang-fraction", str(sickness.hang_fraction),
                                            "--slow-fraction", str(sickness.slow_fraction),
                                            "--slow-ms", str(sickness.slow_ms)]
        self.command, self.repeats, self.fixed = list(command), repeats, fixed
        # Which instances are sick: the simulator picks them from the seed, and so can we.
        self.sick = cpx.SimulatedFleet(size, BENCH_SEED, sickness).sick

    def lower_bound(self, workers):
        """Seconds a run with this many fixed workers takes at least: waves of requests, and
        of hanging ones (each holds a worker for --timeout x (retries + 1))."""
        hanging = sum(1 for kind in self.sick.values() if kind == cpx.HANG)
        hang_seconds = cpx.DEFAULT_TIMEOUT * (cpx.DEFAULT_RETRIES + 1)
        return -(-self.size // workers) * self.latency_ms / 1000.0 + -(-hanging // workers) * hang_seconds

    def healthy_lost(self, output):
        """Rows of instances that are not sick but came out Unknown (json, or JSON Lines for track);
        for the whole-fleet track, instances in the (unknown) group beyond the sick ones, per sample."""
        text = output.strip()
        records = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
        if records and "ip" not in records[0]:
            sick = len(self.sick)
            return sum(max(0, r["instances"] - sick) for r in records if r["service"] is None)
        return sum(1 for r in records if r["status"] == cpx.UNKNOWN and r["ip"] not in self.sick)


BENCH_SEED = 1
SICK_FLEET = 150
BENCH_SHAPES = [
    BenchShape("reference: 1 thread, HTTP/1.0, backlog 5", 150, 0, ["--single-threaded"]),
    BenchShape("concurrent, 20 ms per request", 150),
    BenchShape("concurrent, 20 ms per request", 1000),
    BenchShape("concurrent, 20 ms per request", 10000, repeats=3),
    BenchShape("20 ms, one instance answers HTTP 500 at once", SICK_FLEET,
               sickness=cpx.Sickness(fail_fraction=1.0 / SICK_FLEET)),
    BenchShape("20 ms, 10 instances hang", SICK_FLEET, sickness=cpx.Sickness(hang_fraction=10.0 / SICK_FLEET),
               repeats=3),
    BenchShape("20 ms, half the fleet answers in 700 ms", SICK_FLEET,
               sickness=cpx.Sickness(slow_fraction=0.5, slow_ms=700)),
    BenchShape("reference, one instance answers HTTP 500 at once", SICK_FLEET, 0, ["--single-threaded"],
               sickness=cpx.Sickness(fail_fraction=1.0 / SICK_FLEET)),
    BenchShape("track -n 1 -c 10 --rediscover 3, one HTTP 500", 3000,
               command=("track", cpx.SIMULATED_SERVICES[0], "-n", "1", "-c", "10", "--rediscover", "3",
                        "-o", "json"),
               sickness=cpx.Sickness(fail_fraction=1.0 / 3000), repeats=3, fixed=(128, 64, 32)),
    BenchShape("track -n 1 -c 5, 10 instances hang", 1000,
               command=("track", cpx.SIMULATED_SERVICES[0], "-n", "1", "-c", "5", "-o", "json"),
               sickness=cpx.Sickness(hang_fraction=10.0 / 1000), repeats=3, fixed=(128, 64, 32)),
    BenchShape("track (whole fleet) -n 1 -c 10, one HTTP 500", 1000,
               command=("track", "-n", "1", "-c", "10", "-o", "json"),
               sickness=cpx.Sickness(fail_fraction=1.0 / 1000), repeats=3, fixed=(128, 64, 32)),
]


def measure(args):
    """Wall time and stdout of one run of the CLI."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, CLI] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env())
    elapsed = time.monotonic() - started
    if result.returncode not in (0, 1, 2):
        raise RuntimeError("run failed (%s): %s" % (result.returncode, result.stderr[-300:]))
    return elapsed, result.stdout.decode("utf-8", "replace")


# A fresh, small interpreter starts the run to measure: Linux counts the RSS a
# child had when it forked towards its peak, so forked from this process (which
# holds earlier runs' output) every run would look as big as the benchmark.
_SPAWN_AND_MEASURE = ("import os, subprocess, sys, time\n"
                      "started = time.monotonic()\n"
                      "child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                      "_, _, usage = os.wait4(child.pid, 0)\n"
                      "print(time.monotonic() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)\n")


def measure_usage(args):
    """CPU seconds and peak RSS (MB) of one run of the CLI, output discarded."""
    _, cpu_seconds, peak = run_measured([sys.executable, CLI] + args)
    return cpu_seconds, peak


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def bench_shape(shape):
    """Default and fixed worker counts on one shape, interleaved; a table row."""
    simulator, url = start_simulator_process(shape.size, shape.latency_ms, shape.simulator, seed=BENCH_SEED)
    try:
        configs = [("default", [])] + [(w, ["--concurrency", "fixed", "--workers", str(w)]) for w in shape.fixed]
        times = {name: [] for name, _ in configs}
        lost = {name: [] for name, _ in configs}
        skipped = {}
        for _ in range(shape.repeats):
            for name, options in configs:
                if name in skipped:
                    continue
                measured = [min(v) for v in times.values() if v]
                bound = shape.lower_bound(name) if name != "default" else 0
                if not times[name] and measured and bound > 3 * min(measured):
                    skipped[name] = bound  # it cannot be the best: not worth minutes
                    continue
                elapsed, out = measure(["--url", url] + shape.command + options)
                times[name].append(elapsed)
                lost[name].append(shape.healthy_lost(out))
        cpu, memory = measure_usage(["--url", url] + shape.command)
    finally:
        finish(simulator)
    fixed = {name: median(v) for name, v in times.items() if name != "default" and v}
    best = min(fixed, key=fixed.get)
    default = median(times["default"])
    detail = " ".join("%s:%.2f" % (w, fixed[w]) for w in shape.fixed if w in fixed)
    detail += "".join(" %s:skip(>=%.1f)" % (w, b) for w, b in skipped.items())
    return (shape.label, str(shape.size), "%.2f" % default, "%.2f (%d)" % (fixed[best], best),
            "%.2f" % (default / fixed[best]), "%d" % max(lost["default"]), "%d" % max(lost[best]),
            "%.3f" % (cpu / shape.size * 1000), "%.1f" % memory, detail)


SHARD_FLEET = 10000
SHARD_COUNT = 4


def bench_shards(repeats=5):
    """One shard of SHARD_COUNT against the whole fleet of SHARD_FLEET instances (20 ms each),
    interleaved, on the same simulator: the table rows."""
    simulator, url = start_simulator_process(SHARD_FLEET, 20, [], seed=BENCH_SEED)
    runs = [("whole fleet", []), ("--shard 1/%d" % SHARD_COUNT, ["--shard", "1/%d" % SHARD_COUNT])]
    times = {label: [] for label, _ in runs}
    read = {}
    try:
        for _ in range(repeats):
            for label, options in runs:
                elapsed, out = measure(["--url", url] + options + ["services", "-o", "json"])
                times[label].append(elapsed)
                read[label] = len(json.loads(out))
        usage = {label: measure_usage(["--url", url] + options + ["services", "-o", "json"])
                 for label, options in runs}
    finally:
        finish(simulator)
    whole = median(times["whole fleet"])
    return [(label, str(read[label]), "%.2f" % median(times[label]), "%.2f" % (median(times[label]) / whole),
             "%.2f" % usage[label][0], "%.1f" % usage[label][1]) for label, _ in runs]


# A minimal client, the yardstick of start-up and of a small fleet's read: the same stdlib
# modules, 5 workers, no checks, no table.
MINIMAL_CLIENT = """\
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url = sys.argv[1]
ips = json.loads(urllib.request.urlopen(url + "/servers", timeout=60).read())
def read(ip):
    try:
        with urllib.request.urlopen(url + "/" + ip, timeout=5) as answer:
            return json.loads(answer.read())
    except Exception as error:
        return {"ip": ip, "error": str(error)}
with ThreadPoolExecutor(5) as pool:
    print(json.dumps(list(pool.map(read, ips)), indent=2))
"""
STDLIB_IMPORTS = "import argparse, json, urllib.request, concurrent.futures"


def run_measured(command):
    """Wall seconds, CPU seconds and peak RSS (MB) of one run of a command, output discarded: the
    process's own figures (wait4), taken by a fresh, small interpreter."""
    result = subprocess.run([sys.executable, "-c", _SPAWN_AND_MEASURE] + command, stdout=subprocess.PIPE,
                            universal_newlines=True, env=cli_env(), check=True)
    wall, cpu_seconds, peak_kb = result.stdout.split()
    return float(wall), float(cpu_seconds), int(peak_kb) / 1024.0


def paired(label, command, baseline, runs=21):
    """Run command and baseline in turn, runs times each, after a warm-up; print the medians and
    the median of the pairs' ratios (wall, CPU, peak memory), as one line."""
    run_measured(command), run_measured(baseline)
    pairs = [(run_measured(command), run_measured(baseline)) for _ in range(runs)]
    ratios = [median([a[k] / b[k] for a, b in pairs]) for k in range(3)]
    ours = [median([a[k] for a, _ in pairs]) for k in range(3)]
    theirs = [median([b[k] for _, b in pairs]) for k in range(3)]
    print("  %-58s %7.3f s %7.3f s  wall %.2fx  cpu %.2fx  peak %.1f/%.1f MB %.2fx"
          % (label, ours[0], theirs[0], ratios[0], ratios[1], ours[2], theirs[2], ratios[2]), flush=True)
    return ratios


def bench_startup_and_yardsticks():
    """The tool against a minimal client and the bare imports: paired, medians (issue 21)."""
    import tempfile
    python = [sys.executable]
    print("start-up and yardsticks (paired runs, medians; ours, theirs, ratios):")
    paired("cpx_devops.py --help  vs  python -c '%s'" % STDLIB_IMPORTS[:18], python + [CLI, "--help"],
           python + ["-c", STDLIB_IMPORTS])
    prefix = tempfile.mkdtemp()
    try:
        subprocess.run(["make", "-s", "install", "PREFIX=" + prefix, "PYTHON=" + sys.executable], cwd=HERE,
                       stdout=subprocess.DEVNULL, check=True, env=cli_env({"HOME": prefix}))
        paired("installed cpx-devops --help  vs  the same imports", [os.path.join(prefix, "bin", "cpx-devops"),
               "--help"], python + ["-c", STDLIB_IMPORTS])
    finally:
        subprocess.run(["rm", "-rf", prefix])
    client = os.path.join(HERE, ".bench-minimal-client.py")
    with open(client, "w") as script:
        script.write(MINIMAL_CLIENT)
    try:
        for size, options, label in ((150, ["--single-threaded"], "the canonical server (1 thread, backlog 5)"),
                                     (5000, [], "5,000 instances, a threaded server")):
            simulator, url = start_simulator_process(size, 0, options, seed=BENCH_SEED)
            try:
                paired("services -o json, %s  vs  a minimal client" % label,
                       python + [CLI, "--url", url, "services", "-o", "json"], python + [client, url],
                       runs=21 if size < 1000 else 5)
            finally:
                finish(simulator)
    finally:
        os.unlink(client)


def bench_serve(sizes=(150, 2000, 10000)):
    """A scrape of serve against one run of `services -o prometheus`: paired, medians (issue 22)."""
    import urllib.request
    print("serve: a scrape of /metrics against one-shot -o prometheus, 20 ms per instance (paired, medians):")
    rows = []
    for size in sizes:
        simulator, url = start_simulator_process(size, 20, [], seed=BENCH_SEED)
        exporter = subprocess.Popen([sys.executable, CLI, "--url", url, "-q", "serve", "--listen", "127.0.0.1:0"],
                                    stderr=subprocess.PIPE, universal_newlines=True, env=cli_env())
        try:
            metrics = exporter.stderr.readline().split("serving ")[1].split()[0]
            urllib.request.urlopen(metrics, timeout=120).read()  # a warm-up, as for the one-shot runs
            measure(["--url", url, "-q", "services", "-o", "prometheus"])
            scrapes, shots = [], []
            for _ in range(5 if size < 10000 else 3):
                started = time.monotonic()
                urllib.request.urlopen(metrics, timeout=120).read()
                scrapes.append(time.monotonic() - started)
                shots.append(measure(["--url", url, "-q", "services", "-o", "prometheus"])[0])
            ratio = median([a / b for a, b in zip(scrapes, shots)])
            rows.append((str(size), "%.3f" % median(scrapes), "%.3f" % median(shots), "%.2f" % ratio))
        finally:
            exporter.terminate()
            exporter.wait()
            exporter.stderr.close()
            finish(simulator)
    print(cpx.render_table([cpx.Column("instances", True), cpx.Column("serve scrape s", True),
                            cpx.Column("one-shot s", True), cpx.Column("serve / one-shot", True)], rows), end="")


def bench(quick=False, only=None):
    """Print the benchmark tables of docs/performance.md (only: the parts whose label contains it)."""
    import platform
    cpu_model = "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu_model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print("machine: %s, %d cores, Python %s, %s" % (cpu_model, os.cpu_count(), platform.python_version(),
                                                    time.strftime("%Y-%m-%d")))
    if only is None or only in "startup":
        bench_startup_and_yardsticks()
    if only is None or only in "serve":
        bench_serve((150, 2000) if quick else (150, 2000, 10000))
    header = [cpx.Column(title, right) for title, right in (
        ("shape", False), ("instances", True), ("default s", True), ("best fixed s (workers)", True),
        ("ratio", True), ("lost", True), ("lost fixed", True), ("CPU ms/inst", True), ("peak MB", True),
        ("fixed medians", False))]
    rows = []
    for shape in BENCH_SHAPES:
        if quick and (shape.size > 1000 or shape.command[0] == "track"):
            continue
        if only and only not in shape.label:
            continue
        rows.append(bench_shape(shape))
        print("  measured %s x %d" % (shape.label, shape.size), file=sys.stderr, flush=True)
    if rows:
        print("sick fleets: each shape with the default (adaptive) concurrency and with fixed worker counts:")
        print(cpx.render_table(header, rows), end="")
    if not quick and (only is None or only in "sharding"):
        shard_rows = bench_shards()
        print("sharding: services -o json on %d instances at 20 ms, medians of 5 runs, interleaved; CPU s and "
              "peak MB of one more run each" % SHARD_FLEET)
        print(cpx.render_table([cpx.Column(title, right) for title, right in (
            ("run", False), ("instances read", True), ("median s", True), ("of the whole", True),
            ("CPU s", True), ("peak MB", True))], shard_rows), end="")
    if not rows:
        return
    print("medians of 5 runs (3 for 10,000 instances, hanging instances and track); ratio = default / best "
          "fixed; lost: healthy instances that came out Unknown (the most in one run; for track, rows over "
          "all samples), with the default and with the best fixed count; CPU and peak MB: one run with the "
          "default; skip: a lower bound (waves of requests and of hanging ones) over 3x the best, so not run")


# ---------------------------------------------------------------------------
# The README's examples, rewritten (the README test then checks them)
# ---------------------------------------------------------------------------

def update_readme():
    """Rewrite the output under each example of the README and the docs with what it prints now
    (after a change to the output; the README tests then check it)."""
    for path in [os.path.join(HERE, "README.md")] + sorted(glob.glob(os.path.join(HERE, "docs", "*.md"))):
        with open(path, encoding="utf-8") as document:
            lines = document.read().splitlines()
        out, inside, skipping, setup = [], False, False, []
        for line in lines:
            if line.startswith("```"):
                inside, skipping = not inside, False
            elif inside and line.startswith("$ printf "):
                setup.append(line[2:])
            elif inside and line.startswith("$ "):
                skipping = False
                if line.startswith("$ python3 cpx_devops.py") and not re.search(r" (simulate|serve)\b", line):
                    out.append(line)
                    out.extend(run_readme_command("; ".join(setup + [line[2:]])))
                    skipping, setup = True, []
                    continue
                setup = []
            elif skipping:
                continue
            out.append(line)
        with open(path, "w", encoding="utf-8") as document:
            document.write("\n".join(out) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
        bench(quick="--quick" in sys.argv, only=only)
    elif sys.argv[1:2] == ["readme"]:
        update_readme()
    else:
        sys.exit(__doc__)
