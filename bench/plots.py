"""PNG plots of the bench results, written next to the results files (matplotlib, `pip install -e .[bench]`).

    python3 bench/plots.py            # every plot from the bench/results/*.md files present

bench/results/handoff.png    req/s and front-end CPU per request against response size: direct, HAProxy,
                             tcpha (the first table of bench/results/handoff.md)
bench/results/handoff-sweep.png  req/s, front-end and back-end CPU per request against response size (1 KiB
                             to 4 MiB): direct, HAProxy and each tcpha data path (relay splice|bpf x
                             steering nft|bpf), from the "Every point" table of bench/results/handoff-sweep.md
                             (`bench/handoff/run.py --sweep`; direct and HAProxy: the median of the rounds)
bench/results/distcache-redis.png  dc_server ops/s against clients: embedded store, Redis, Redis Cluster
                             (bench/results/distcache-redis.md) next to the original C dc_server's
                             figures (the "target" column of bench/results/distcache.md, TCP, persistent dc_test)

The benches call these after writing their results (bench/handoff/run.py, bench/distcache/redis_backends.py);
the plots read the markdown tables, so a plot can be redrawn from a committed results file without a rerun.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZE_KIB = {"1 KiB": 1, "100 KiB": 100, "1 MiB": 1024}


def read_table(path: Path, first_column: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in `path` whose first header cell is `first_column`."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_column:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(cells, (c.strip() for c in row.strip().strip("|").split("|")))))
            return rows
    raise ValueError(f"{path}: no table starting with column {first_column!r}")


def number(text: str) -> float:
    text = text.replace(",", "").strip()
    return float(text) if re.fullmatch(r"[0-9.]+", text) else float("nan")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_handoff(results: Path = RESULTS / "handoff.md", png: Path | None = None) -> Path:
    plt = _pyplot()
    png = png or results.with_suffix(".png")
    rows = read_table(results, "size")
    fig, (rps_ax, cpu_ax) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"direct": ("#888888", "s", "direct to nginx"), "haproxy": ("#d95f02", "^", "HAProxy 2.6"),
              "tcpha": ("#1b9e77", "o", "tcpha (TCP handoff)")}
    for path, (color, marker, label) in styles.items():
        mine = sorted((SIZE_KIB[r["size"]], r) for r in rows if r["path"] == path and r["size"] in SIZE_KIB)
        if not mine:
            continue
        sizes = [s for s, _ in mine]
        rps_ax.plot(sizes, [number(r["req/s"]) for _, r in mine], marker=marker, color=color, label=label)
        cpu = [number(r["FE CPU us/req"]) for _, r in mine]
        if any(c == c for c in cpu):
            cpu_ax.plot(sizes, cpu, marker=marker, color=color, label=label)
    for ax, title, ylabel in ((rps_ax, "Requests per second", "req/s"),
                              (cpu_ax, "Front-end CPU per request", "µs of CPU per request")):
        ax.set_xscale("log")
        ax.set_xticks(list(SIZE_KIB.values()), list(SIZE_KIB))
        ax.minorticks_off()
        ax.set_xlabel("response size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=.3)
        ax.legend()
    cpu_ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    low, high = cpu_ax.get_ylim()
    cpu_ax.set_yticks([t for t in (50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000) if low <= t <= high])
    cpu_ax.yaxis.set_major_formatter(ScalarFormatter())
    cpu_ax.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(_run_line(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _kib(label: str) -> float:
    value, unit = label.split()
    return float(value) * {"KiB": 1, "MiB": 1024}[unit]


def plot_sweep(results: Path = RESULTS / "handoff-sweep.md", png: Path | None = None) -> Path:
    """Four panels against response size: req/s; tcpha's req/s over HAProxy's measured next to it (same
    round, same size); FE CPU per request; BE CPU per request."""
    import statistics
    plt = _pyplot()
    png = png or results.with_suffix(".png")
    rows = read_table(results, "round")
    points: dict[str, dict[float, dict[str, list[float]]]] = {}
    by_round: dict[tuple[str, str, str], float] = {}
    for r in rows:
        cell = points.setdefault(r["path"], {}).setdefault(_kib(r["size"]), {})
        for key in ("req/s", "FE CPU us/req", "BE CPU us/req"):
            cell.setdefault(key, []).append(number(r[key]))
        by_round[(r["round"], r["size"], r["path"].split()[0])] = number(r["req/s"])
    for r in rows:                                  # tcpha over the HAProxy point of its own round
        if r["path"].startswith("tcpha"):
            hap = by_round.get((r["round"], r["size"], "haproxy"), float("nan"))
            points[r["path"]][_kib(r["size"])].setdefault("ratio", []).append(
                number(r["req/s"]) / hap if hap and hap == hap else float("nan"))
    fixed = {"direct": ("#888888", "s", "-", "direct to nginx"), "haproxy": ("#d95f02", "^", "-", "HAProxy 2.6")}
    tcpha_styles = [("#1b9e77", "o", "-"), ("#7570b3", "D", "--"), ("#e7298a", "v", "-."), ("#66a61e", "P", ":")]
    styles = dict(fixed)
    for i, path in enumerate(p for p in points if p not in fixed):
        color, marker, line = tcpha_styles[i % len(tcpha_styles)]
        styles[path] = (color, marker, line, path.replace("+", " relay, ") + " steering")
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = (("req/s", "Requests per second (32 clients)", "req/s"),
              ("ratio", "tcpha's req/s over HAProxy's, measured next to it", "tcpha / HAProxy"),
              ("FE CPU us/req", "Front-end CPU per request", "µs of CPU per request"),
              ("BE CPU us/req", "Back-end CPU per request (tcpha-be)", "µs of CPU per request"))
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        for path, (color, marker, line, label) in styles.items():
            if path not in points:
                continue
            sizes = sorted(points[path])
            # a point with no request completed (0 req/s, no CPU figure) is left out, not drawn as 0
            kept = [[v for v in points[path][s].get(key, []) if v == v and v > 0] for s in sizes]
            values = [statistics.median(v) if v else float("nan") for v in kept]
            if all(v != v for v in values):
                continue
            ax.plot(sizes, values, marker=marker, linestyle=line, color=color, label=label, markersize=5)
        if key == "ratio":
            ax.axhline(1.0, color="#d95f02", linewidth=1, linestyle="-", alpha=.6)
            for kib, want, text in ((1, 0.7, "target 0.7x"), (100, 1.5, "target 1.5x"), (1024, 4.0, "target 4x")):
                ax.plot([kib], [want], marker="_", markersize=18, color="black")
                ax.annotate(text, (kib, want), textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({s for p in points.values() for s in p})
        ax.set_xticks(ticks, [f"{s / 1024:g} MiB" if s >= 1024 else f"{s:g} KiB" for s in ticks], rotation=45)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("response size")
        ax.set_ylabel(ylabel + " (log)")
        ax.set_title(title)
        ax.grid(True, alpha=.3)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0][0].legend(fontsize=7)
    axes[0][1].legend(fontsize=7)
    fig.suptitle(_sweep_title(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _sweep_title(results: Path) -> str:
    text = results.read_text()
    when = re.search(r"^Run (\S+ \S+ UTC)", text, re.M)
    load = re.search(r"load average \(1 min\) ([0-9. >-]+?) at the start", text)
    return (f"bench/handoff/run.py --sweep, {when.group(1) if when else '?'}, 2 cores shared with other test "
            f"runs (load average {load.group(1) if load else '?'})\ndirect and HAProxy: the median of the "
            "rounds; the figures move with the machine's load: compare ratios, not absolute figures")


def plot_distcache(results: Path = RESULTS / "distcache-redis.md", c_targets: Path = RESULTS / "distcache.md",
                   png: Path | None = None) -> Path:
    plt = _pyplot()
    png = png or results.with_suffix(".png")
    rows = read_table(results, "backend")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["servers"].startswith("1 "):                    # one dc_server in front of each store
            series.setdefault(r["backend"], []).append((int(number(r["clients"])), number(r["ops/s (sum)"])))
    for name, points in series.items():
        points.sort()
        ax.plot([c for c, _ in points], [v for _, v in points], marker="o", label=f"dc_server, {name}")
    if c_targets.exists():
        c_points = []
        for r in read_table(c_targets, "load"):
            if r["transport"].startswith("TCP") and "-persistent" in r["load"]:
                clients = 4 if "four" in r["load"] else 1
                c_points.append((clients, number(r["target"])))
        if c_points:
            c_points.sort()
            ax.plot([c for c, _ in c_points], [v for _, v in c_points], marker="s", linestyle="--", color="black",
                    label="original C dc_server (distcache 1.4)")
    ax.set_xlabel("dc_test -persistent clients")
    ax.set_ylabel("operations per second")
    ax.set_xticks(sorted({c for pts in series.values() for c, _ in pts} | {1, 4}))
    ax.set_title("dc_server throughput by session store")
    ax.grid(True, alpha=.3)
    ax.legend(fontsize=8)
    fig.suptitle(_run_line(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _run_line(results: Path) -> str:
    """The results file's first line saying when and where it ran, shortened, for the figure."""
    lines = results.read_text().splitlines()
    for line in [l for l in lines if l.startswith("Run ")] + [l for l in lines if l.startswith("# ")]:
        return (line.lstrip("# ").split(";")[0])[:140]
    return results.name


def plot_after_run(fn, *args) -> None:
    """For the benches: draw the plot, or say in one line why not (matplotlib missing)."""
    try:
        print(f"plot: {fn(*args)}")
    except ImportError as e:
        print(f"plot not drawn ({e}; pip install -e .[bench])", file=sys.stderr)


def main() -> int:
    done = []
    if (RESULTS / "handoff.md").exists():
        done.append(plot_handoff())
    if (RESULTS / "handoff-sweep.md").exists():
        done.append(plot_sweep())
    if (RESULTS / "distcache-redis.md").exists():
        done.append(plot_distcache())
    for p in done:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
