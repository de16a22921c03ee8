"""``docs/benchmarks.md`` (tables) and ``docs/benchmarks.png`` (chart), generated from ``results.json``.

The Markdown goes between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``; text
outside the markers is kept, so the page can carry prose of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKDOWN = Path("docs/benchmarks.md")
CHART = Path("docs/benchmarks.png")
BEGIN = "<!-- benchmarks:begin -->"
END = "<!-- benchmarks:end -->"
INTRO = """# Benchmarks: Conveyor and its Python peers

How fast Conveyor enqueues, runs and finishes jobs next to the Python job systems people would
otherwise pick, on one small machine, measured by one harness that times every system the same
way. Rerun it with `uv run --group bench python -m benchmarks` (about 20 minutes; `--quick` for a
smoke run); see `benchmarks/__main__.py` for the options and `benchmarks/systems/` for how each
system is set up.

"""
QUIET_LOAD = 0.5
LOG_SCALE_SPREAD = 100
"""A chart goes logarithmic when its largest value is this many times its smallest."""
TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"
WORKLOAD_TITLES = {"w1": "W1", "w2": "W2", "w3": "W3", "w4": "W4"}


def _summary(results: dict[str, Any], name: str, workload: str, metric: str) -> dict[str, float] | None:
    entry = results["systems"].get(name, {})
    return entry.get("workloads", {}).get(workload, {}).get("summary", {}).get(metric)


def _number(value: float, kind: str) -> str:
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}"
    return f"{value:.2f}"


def _cell(figure: dict[str, float] | None, kind: str, runs: int) -> str:
    if figure is None:
        return "—"
    text = _number(figure["median"], kind)
    if runs > 1:
        text += f" ({_number(figure['min'], kind)}{DASH}{_number(figure['max'], kind)})"
    return text


def _ratio(figure: dict[str, float] | None, reference: dict[str, float] | None) -> str:
    if figure is None or reference is None or not reference["median"]:
        return "—"
    return f"{figure['median'] / reference['median']:.2f}{TIMES}"


def _problems(entry: dict[str, Any], workload: str) -> str:
    slot = entry.get("workloads", {}).get(workload, {})
    errors = slot.get("errors", [])
    if not errors:
        return ""
    ran = len(slot.get("runs", []))
    return f"{len(errors)} of {ran + len(errors)} runs failed"


def _table(results: dict[str, Any], workload: str, columns: list[tuple[str, str, str, bool]]) -> list[str]:
    """``columns``: (heading, metric, kind, with ratio)."""
    runs = results["options"]["runs"]
    reference = results["reference"]
    heading = ["System"]
    for title, _, _, ratio in columns:
        heading += [title, f"{TIMES} Conveyor PG"] if ratio else [title]
    lines = ["| " + " | ".join(heading) + " |", "|" + "---|" * len(heading)]
    for name, entry in results["systems"].items():
        if workload not in entry.get("workloads", {}):
            continue
        row = [entry["label"]]
        for _, metric, kind, ratio in columns:
            figure = _summary(results, name, workload, metric)
            row.append(_cell(figure, kind, runs))
            if ratio:
                row.append(_ratio(figure, _summary(results, reference, workload, metric)))
        problem = _problems(entry, workload)
        if problem:
            row[0] += f" ({problem})"
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _machine_line(results: dict[str, Any]) -> str:
    machine = results["machine"]
    pg = machine.get("postgresql_settings", {})
    redis = machine.get("redis_settings", {})
    return (
        f"Measured {results['when'][:10]} on {machine['cores']} cores ({machine['cpu']}), {machine['ram_gib']} GiB; "
        f"Python {machine['python']}; PostgreSQL {machine.get('postgresql', '?')} "
        f"(fsync {pg.get('fsync', '?')}, synchronous_commit {pg.get('synchronous_commit', '?')}); "
        f"Redis {machine.get('redis', '?')} (appendonly {redis.get('appendonly', '?')}: Redis-backed systems "
        f"keep jobs in memory only); SQLite {machine.get('sqlite', '?')}. Conveyor at commit "
        f"{results.get('conveyor_commit') or '?'}" + _commit_note(results) + "." + _load_note(machine)
    )


def _commit_note(results: dict[str, Any]) -> str:
    end = results.get("conveyor_commit_at_end")
    if not end or end == results.get("conveyor_commit"):
        return ""
    return f" at the start and {end} at the end (the source changed during the run: workers started later ran it)"


def _load_note(machine: dict[str, Any]) -> str:
    start = machine.get("load_average_at_start")
    end = machine.get("load_average_at_end")
    if not start:
        return ""
    note = f" 1-minute load average {start[0]:.2f} at the start"
    note += f" and {end[0]:.2f} at the end" if end else ""
    if start[0] >= QUIET_LOAD:
        note += " (other work was running on the machine: treat small differences as noise)"
    return note + "."


def markdown(results: dict[str, Any]) -> str:
    options = results["options"]
    runs = options["runs"]
    lines = [
        _machine_line(results),
        "",
        f"{runs} run{'s' if runs > 1 else ''}"
        + (f"; each figure is the median, with (min{DASH}max)." if runs > 1 else "; one figure each.")
        + f" Ratios are to Conveyor on PostgreSQL: above 1{TIMES} means more jobs/s for throughput, and"
        " slower for latency and wall time."
        + (" **A `--quick` smoke run: small job counts, not for comparison.**" if options.get("quick") else ""),
        "",
        f"![Benchmark chart]({CHART.name})",
        "",
        f"## W1 throughput: {options['jobs']:,} no-op jobs",
        "",
        "Enqueued first (bulk API where the system has one), then workers start; processing runs from",
        "the first job done to the last, counted by each task's own side effect (a byte appended to a",
        "file). The floors run the same cycle in raw SQL, with no queue library.",
        "",
        *_table(
            results,
            "w1",
            [
                ("Enqueue jobs/s", "enqueue_per_s", "rate", True),
                ("Process jobs/s", "process_per_s", "rate", True),
                ("Worker start to first job s", "startup_s", "s", False),
            ],
        ),
        "",
        f"## W2 latency: {options['latency_jobs']} jobs, one at a time, idle warmed worker",
        "",
        "From the enqueue call to the task's side effect, each job awaited before the next.",
        "",
        *_table(results, "w2", [("p50 ms", "p50_ms", "ms", True), ("p99 ms", "p99_ms", "ms", True)]),
        "",
        (
            f"## W3 I/O concurrency: {options['io_jobs']:,} jobs sleeping {options['io_sleep_s'] * 1000:.0f} ms, "
            f"{options['io_concurrency']} at a time"
        ),
        "",
        (
            f"Ideal: {options['io_jobs'] / options['io_concurrency'] * options['io_sleep_s']:.2f} s. Wall time runs"
            " from the first enqueue to the last job done, with the workers already warm."
        ),
        "",
        *_table(results, "w3", [("Wall s", "wall_s", "s", True), ("of which enqueue s", "enqueue_s", "s", False)]),
        "",
    ]
    lines += _scaling(results)
    for workload in sorted({w for entry in results["systems"].values() for w in entry.get("workloads", {})}):
        if workload in {"w1", "w2", "w3"}:
            continue
        metrics = sorted(
            {
                m
                for entry in results["systems"].values()
                for m in entry["workloads"].get(workload, {}).get("summary", {})
            }
        )
        lines += [f"## {WORKLOAD_TITLES.get(workload, workload)}", ""]
        lines += _table(results, workload, [(metric, metric, "s", True) for metric in metrics])
        lines.append("")
    lines += _configurations(results)
    return "\n".join(lines).rstrip() + "\n"


def _scaling(results: dict[str, Any]) -> list[str]:
    scaling = results.get("w5")
    if not scaling or not scaling.get("processes"):
        return []
    runs = results["options"]["runs"]
    lines = [
        f"## W5 scaling: Conveyor-on-PostgreSQL W1 ({results['options']['jobs']:,} jobs) by worker processes",
        "",
        f"| Worker processes | Process jobs/s | {TIMES} 1 process |",
        "|---|---|---|",
    ]
    one = scaling["processes"].get("1", {}).get("summary", {}).get("process_per_s")
    for processes, slot in scaling["processes"].items():
        figure = slot.get("summary", {}).get("process_per_s")
        lines.append(f"| {processes} | {_cell(figure, 'rate', runs)} | {_ratio(figure, one)} |")
    floor = _summary(results, "floor_postgres", "w1", "process_per_s")
    if floor is not None:
        lines += ["", f"The PostgreSQL floor on the same machine: {_number(floor['median'], 'rate')} jobs/s."]
    return [*lines, ""]


def _configurations(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Systems and their setup",
        "",
        "Each system in its best setup for this 2-core machine (tuned on W1), the same setup for W1 and W2;",
        (
            "W3 uses each system's way of running 100 jobs at once. Every task writes its byte and returns; "
            "logging at WARNING."
        ),
        "",
        "| System | Version | Setup for W1 and W2 | Setup for W3 |",
        "|---|---|---|---|",
    ]
    missing = []
    for entry in results["systems"].values():
        if "unavailable" in entry:
            missing.append(f"- {entry['label']}: not run: {entry['unavailable']}.")
            continue
        config = entry.get("configuration", {})
        cells = [entry["label"], entry.get("version", "?"), config.get("general", "—"), config.get("io", "—")]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [
        f"- {entry['label']} {workload}: {error.splitlines()[0][:300]}"
        for entry in results["systems"].values()
        for workload, slot in entry.get("workloads", {}).items()
        for error in slot.get("errors", [])[:1]
    ]
    if missing or failures:
        lines += ["", "### Not run, or failed", "", *missing, *failures]
    return [*lines, ""]


def write_markdown(results: dict[str, Any], root: Path) -> None:
    path = root / MARKDOWN
    block = f"{BEGIN}\n<!-- Generated by `python -m benchmarks` from benchmarks/results/results.json. -->\n\n"
    block += markdown(results) + f"\n{END}\n"
    existing = path.read_text() if path.exists() else ""
    if BEGIN in existing and END in existing:
        before, _, rest = existing.partition(BEGIN)
        _, _, after = rest.partition(END)
        text = before + block.rstrip("\n") + after
    else:
        text = (existing.rstrip() + "\n\n" if existing.strip() else INTRO) + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- the chart ---------------------------------------------------------------------------------


def _color(name: str) -> str:
    if name.startswith("conveyor"):
        return "#1f77b4"
    if name.startswith("floor"):
        return "#2ca02c"
    return "#8c8c8c"


def _bars(
    axis: Any, results: dict[str, Any], workload: str, metric: str, title: str, unit: str, marker: str | None = None
) -> None:
    """Horizontal bars of ``metric``'s median with min-max whiskers; ``marker`` adds a second metric as dots."""
    names, medians, lows, highs = [], [], [], []
    for name, entry in results["systems"].items():
        figure = _summary(results, name, workload, metric)
        if figure is None:
            continue
        names.append(name)
        medians.append(figure["median"])
        lows.append(figure["median"] - figure["min"])
        highs.append(figure["max"] - figure["median"])
        entry.setdefault("label", name)
    labels = [results["systems"][name]["label"] for name in names]
    positions = list(range(len(names)))[::-1]
    axis.barh(positions, medians, xerr=[lows, highs], color=[_color(n) for n in names], capsize=3)
    axis.set_yticks(positions, labels, fontsize=8)
    axis.set_title(title, fontsize=10)
    axis.set_xlabel(unit, fontsize=8)
    ends = [value + high for value, high in zip(medians, highs, strict=True)]
    if marker is not None:
        extra = [(_summary(results, name, workload, marker) or {}).get("median") for name in names]
        axis.scatter(extra, positions, marker="D", color="k", s=14, zorder=3, label=marker.replace("_", " "))
        axis.legend(fontsize=8, loc="lower right")
        ends = [max(end, other or 0) for end, other in zip(ends, extra, strict=True)]
    if ends and max(ends) / max(min(medians, default=1), 1e-9) > LOG_SCALE_SPREAD:
        axis.set_xscale("log")
    for position, value, end in zip(positions, medians, ends, strict=True):
        axis.annotate(
            f"{value:,.0f}" if value >= 100 else f"{value:.2f}",
            (end, position),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )


def write_chart(results: dict[str, Any], root: Path) -> None:
    import matplotlib as mpl  # noqa: PLC0415 - bench group only, and the backend must be set first

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    options = results["options"]
    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
    _bars(axes[0][0], results, "w1", "process_per_s", f"W1: processing {options['jobs']:,} no-op jobs", "jobs/s")
    _bars(
        axes[0][1],
        results,
        "w2",
        "p50_ms",
        f"W2: latency p50 (bars) and p99, {options['latency_jobs']} jobs one at a time",
        "ms",
        marker="p99_ms",
    )
    _bars(
        axes[1][0],
        results,
        "w3",
        "wall_s",
        f"W3: {options['io_jobs']:,} sleeps of {options['io_sleep_s'] * 1000:.0f} ms, "
        f"{options['io_concurrency']} at once",
        "wall s (dashed: ideal)",
    )
    axes[1][0].axvline(options["io_jobs"] / options["io_concurrency"] * options["io_sleep_s"], ls="--", color="k")
    scaling_axis = axes[1][1]
    scaling = (results.get("w5") or {}).get("processes", {})
    points = [(int(p), slot["summary"]["process_per_s"]) for p, slot in scaling.items() if "summary" in slot]
    if points:
        xs = [p for p, _ in points]
        ys = [s["median"] for _, s in points]
        errors = [[s["median"] - s["min"] for _, s in points], [s["max"] - s["median"] for _, s in points]]
        scaling_axis.errorbar(xs, ys, yerr=errors, marker="o", color=_color("conveyor"), capsize=3, label="Conveyor PG")
        for x, y in zip(xs, ys, strict=True):
            scaling_axis.annotate(f"{y:,.0f}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7)
        scaling_axis.set_xticks(xs)
        scaling_axis.set_ylim(bottom=0, top=max(s["max"] for _, s in points) * 1.25)
        scaling_axis.legend(fontsize=8, loc="lower right")
        floor = _summary(results, "floor_postgres", "w1", "process_per_s")
        if floor is not None:
            scaling_axis.annotate(
                f"raw-SQL floor on PostgreSQL (W1): {floor['median']:,.0f} jobs/s, off this scale",
                (0.02, 0.95),
                xycoords="axes fraction",
                fontsize=8,
                color=_color("floor"),
                va="top",
            )
    scaling_axis.set_title("W5: Conveyor-on-PostgreSQL W1 by worker processes", fontsize=10)
    scaling_axis.set_xlabel("worker processes", fontsize=8)
    scaling_axis.set_ylabel("jobs/s", fontsize=8)
    machine = results["machine"]
    runs = options["runs"]
    figure.suptitle(
        f"Conveyor and its Python peers: {machine['cores']} cores, Python {machine['python']}, "
        f"median of {runs} run{'s' if runs > 1 else ''} (bars: min-max)"
        + (" - QUICK SMOKE RUN" if options.get("quick") else ""),
        fontsize=11,
    )
    figure.tight_layout()
    path = root / CHART
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_docs(results: dict[str, Any], root: Path) -> None:
    write_markdown(results, root)
    write_chart(results, root)
