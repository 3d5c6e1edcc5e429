"""Benchmark results -> a compact text summary, and Markdown tables and PNG plots.

    pytest benchmarks/ --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json                 # summary here; tables + plots in .benchmarks/report
    python -m benchmarks.report run.json --update-docs   # rewrite docs/benchmarks.md, its plots, README.md's
                                                         # benchmark section and benchmarks/results/<kind>.json

Inputs: a pytest-benchmark JSON (`--benchmark-json`) or the results.json of the GPU check
(`python -m benchmarks.gpu_check`), which adds the collapsed-codebook backward, training steps and the
check's verdicts. Without --update-docs nothing tracked is written (docs/, benchmarks/results/,
README.md); with it, docs/benchmarks.md is rebuilt from every run in benchmarks/results/, one per
device kind, the new run replacing the one of its kind.

Times are medians. Speed-ups divide the reference's median by each implementation's, both taken in
the same run, with the same lookup mode where the reference was timed in it, else the reference in
its default lookup. GFLOP/s count 2*d flops per (group vector, code) pair of the lookup, whatever the
mode, beside the machine's float32 matmul rate measured in the same run (and, on a GPU, its fp32 FMA
peak). "OOM" marks a case whose peak memory exceeded the budget or the GPU: a result, not a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
DEFAULT_OUT = ROOT / ".benchmarks" / "report"  # git-ignored
TRACKED = (DOCS, RESULTS, README)
GPU_CHECK_FORMAT = "gsq-gpu-check"
# Display names of the modes, in table order: implementations.MODES, then the GPU check's backward alone.
MODE_NAMES = {"lookup": "lookup", "forward": "forward", "forward_backward": "fwd+bwd", "backward": "bwd"}
MODES = tuple(MODE_NAMES)
IMPL_ORDER = ("reference", "reference-compiled", "cpu", "cuda", "triton", "vqtorch", "faiss")
PEERS = {"reference-compiled": "compiled", "vqtorch": "vqtorch", "faiss": "faiss"}
SWEEPS = (("V-sweep", "V"), ("d-sweep", "d"))


# ------------------------------------------------------------------------------------------------
# Loading


def load(path: Path) -> dict:
    return load_dict(json.loads(Path(path).read_text()))


def load_dict(data: dict) -> dict:
    """A run: {"rows", "machine", "datetime", "default_lookup", "training", "checks", "dry_run", "source"}
    from either input format. Rows: setting (dict), implementation, lookup, mode, device, status
    ("ok", "oom", "unsupported", "error"), median_s, peak_extra_bytes, lookup_flops, matmul_gflops."""
    if data.get("format") == GPU_CHECK_FORMAT:
        return {
            "rows": data.get("rows", []),
            "machine": data.get("machine", {}),
            "datetime": data.get("datetime", ""),
            "default_lookup": data.get("default_lookup"),
            "training": data.get("training", []),
            "checks": data.get("checks", []),
            "dry_run": bool(data.get("dry_run")),
            "source": "gpu_check",
        }
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "implementation" not in info:
            continue
        rows.append({"lookup": None, **info, "median_s": bench["stats"]["median"], "status": "ok"})
    for entry in data.get("gsq_not_run", []):
        rows.append({"lookup": None, **entry})
    return {
        "rows": rows,
        "machine": data.get("gsq_machine", {}),
        "datetime": data.get("datetime", ""),
        "default_lookup": data.get("gsq_default_lookup"),
        "training": [],
        "checks": [],
        "dry_run": False,
        "source": "pytest-benchmark",
    }


def device_kind(machine: dict, device: str) -> str:
    info = machine.get(device, {})
    if device == "cuda":
        return "gpu-" + info.get("gpu", "unknown").lower().replace(" ", "-")
    return f"cpu-{info.get('cores', '?')}core-{info.get('gsq_cpu_kernels', 'unknown')}"


def label(row: dict) -> str:
    return row["implementation"] if row.get("lookup") is None else f"{row['implementation']}:{row['lookup']}"


def _key(row: dict) -> tuple:
    return (row["device"], row["setting"]["name"], row["mode"], row["implementation"], row.get("lookup"))


LOOKUP_ORDER = (None, "exact", "dot")  # the default lookup first


def _order(row: dict) -> tuple:
    impl, lookup = row["implementation"], row.get("lookup") or None
    return (
        MODES.index(row["mode"]) if row["mode"] in MODES else 9,
        IMPL_ORDER.index(impl) if impl in IMPL_ORDER else 99,
        LOOKUP_ORDER.index(lookup) if lookup in LOOKUP_ORDER else 9,
        str(lookup),
    )


def reference_for(row: dict, by_key: dict, default_lookup: str | None) -> dict | None:
    """The reference a row is compared with: the same lookup mode if timed, else the default one."""
    device, name, mode = row["device"], row["setting"]["name"], row["mode"]
    for lookup in (row.get("lookup"), default_lookup, None):
        found = by_key.get((device, name, mode, "reference", lookup))
        if found is not None:
            return found
    return None


def peer_for(row: dict, peer: str, by_key: dict, default_lookup: str | None) -> dict | None:
    device, name, mode = row["device"], row["setting"]["name"], row["mode"]
    return by_key.get((device, name, mode, peer, None)) or by_key.get((device, name, mode, peer, default_lookup))


# ------------------------------------------------------------------------------------------------
# Cells


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def ratio(numerator: dict | None, denominator: dict | None) -> str:
    """numerator's median / denominator's median ("12.3x", "0.94x"), or "-" when either did not run."""
    if not numerator or not denominator or numerator.get("status") != "ok" or denominator.get("status") != "ok":
        return "-"
    value = numerator["median_s"] / denominator["median_s"]
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _not_ok(row: dict) -> str:
    return {"oom": "OOM", "error": "error", "timeout": "timeout"}.get(row["status"], "n/a")


def gflops_cell(row: dict, machine: dict) -> str:
    if row.get("status") != "ok" or not row.get("lookup_flops") or row["mode"] == "backward":
        return "-"
    rate = row["lookup_flops"] / row["median_s"] / 1e9
    parts = []
    matmul = row.get("matmul_gflops") or machine.get("matmul_gflops")
    if matmul:
        parts.append(f"{100 * rate / matmul:.0f}% mm")
    if machine.get("fp32_peak_gflops"):
        parts.append(f"{100 * rate / machine['fp32_peak_gflops']:.0f}% peak")
    shown = f"{rate:.1f}" if rate < 100 else f"{rate:.0f}"
    return f"{shown} ({', '.join(parts)})" if parts else shown


# ------------------------------------------------------------------------------------------------
# Markdown tables


def setting_table(run: dict, device: str, setting_name: str, previous: dict) -> str:
    by_key = {_key(r): r for r in run["rows"]}
    machine = run["machine"].get(device, {})
    rows = sorted(
        (
            r
            for r in run["rows"]
            if r["device"] == device and r["setting"]["name"] == setting_name and r["status"] != "unsupported"
        ),
        key=_order,
    )
    lines = [
        "| implementation | mode | time (median) | speed-up vs reference | peak extra memory | "
        "GFLOP/s (% of fp32 matmul / peak) | vs previous run |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {label(row)} | {MODE_NAMES[row['mode']]} | {_not_ok(row)} | - | {_not_ok(row)} | - | - |")
            continue
        reference = reference_for(row, by_key, run.get("default_lookup"))
        lines.append(
            f"| {label(row)} | {MODE_NAMES[row['mode']]} | {fmt_time(row['median_s'])} | "
            f"{ratio(reference, row)} | {fmt_bytes(row.get('peak_extra_bytes'))} | "
            f"{gflops_cell(row, machine)} | {ratio(previous.get(_key(row)), row)} |"
        )
    return "\n".join(lines)


def sweep_table(run: dict, device: str, prefix: str, axis: str, mode: str) -> str:
    rows = [
        r
        for r in run["rows"]
        if r["device"] == device
        and r["setting"]["name"].startswith(prefix)
        and r["mode"] == mode
        and r["status"] != "unsupported"
    ]
    by_key = {_key(r): r for r in rows}
    names = sorted({r["setting"]["name"] for r in rows}, key=lambda n: int(n.rsplit("-", 1)[1]))
    variants = sorted(
        {(r["implementation"], r.get("lookup")) for r in rows},
        key=lambda v: _order({"mode": mode, "implementation": v[0], "lookup": v[1]}),
    )
    header = (
        "| "
        + axis
        + " | "
        + " | ".join(f"{label({'implementation': i, 'lookup': lk})} time / memory" for i, lk in variants)
        + " |"
    )
    lines = [header, "|" + "---|" * (len(variants) + 1)]
    for name in names:
        cells = []
        for impl, lookup in variants:
            row = by_key.get((device, name, mode, impl, lookup))
            if row is None:
                cells.append("-")
            elif row["status"] != "ok":
                cells.append(_not_ok(row))
            else:
                speedup = ratio(reference_for(row, by_key, run.get("default_lookup")), row)
                extra = f" ({speedup})" if impl != "reference" and speedup != "-" else ""
                cells.append(f"{fmt_time(row['median_s'])}{extra} / {fmt_bytes(row.get('peak_extra_bytes'))}")
        lines.append(f"| {name.rsplit('-', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(training: list[dict]) -> str:
    lines = [
        "| model.quantizer_backend | runs on | batch | step time (median) | peak memory | "
        "quantizer fwd+bwd | quantizer share of the step |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in training:
        if t.get("status") != "ok":
            lines.append(
                f"| {t['backend']} | - | {t.get('batch', '-')} | {t.get('status')}: "
                f"{str(t.get('reason', ''))[:80]} | - | - | - |"
            )
            continue
        share = t.get("quantizer_share")
        lines.append(
            f"| {t['backend']} | {t.get('resolved_backend', '-')} | {t['batch']} | "
            f"{fmt_time(t['step_s'])} (of {len(t.get('step_times_s', []))}) | "
            f"{fmt_bytes(t.get('peak_bytes'))} | "
            f"{fmt_time(t['quantizer_s']) if t.get('quantizer_s') else '-'} | "
            f"{f'{100 * share:.1f}%' if share is not None else '-'} |"
        )
    return "\n".join(lines)


def checks_table(checks: list[dict]) -> str:
    lines = ["| check | verdict | time (budget) |", "|---|---|---|"]
    for c in checks:
        lines.append(
            f"| {c['name']} | {c['status']}: {c['verdict']} | {c.get('seconds', 0):.0f} s "
            f"({c.get('budget_s', 0):.0f} s) |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The compact text summary (100 columns)


def compact_summary(run: dict, width: int = 100) -> str:
    """Per device, setting and mode: time, speed-up over the reference and over each peer, peak memory."""
    rows = [r for r in run["rows"] if r["status"] != "unsupported"]
    by_key = {_key(r): r for r in run["rows"]}
    default_lookup = run.get("default_lookup")
    out = []
    for device in sorted({r["device"] for r in rows}):
        info = run["machine"].get(device, {})
        what = info.get("gpu") or f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores"
        out += [
            f"gsq benchmarks on {device} ({what}): median time; peak extra memory; x ref = speed-up",
            "over the reference (same lookup where timed); x <peer> = speed-up over that peer",
        ]
        for name in _setting_names(rows, device):
            subset = sorted((r for r in rows if r["device"] == device and r["setting"]["name"] == name), key=_order)
            peers = [p for p in PEERS if any(r["implementation"] == p for r in subset)]
            header = ["mode", "implementation", "time", "memory", "x ref", *[f"x {PEERS[p]}" for p in peers]]
            table = [header]
            for row in subset:
                ok = row["status"] == "ok"
                table.append(
                    [
                        MODE_NAMES.get(row["mode"], row["mode"]),
                        label(row),
                        fmt_time(row["median_s"]) if ok else _not_ok(row),
                        fmt_bytes(row.get("peak_extra_bytes")) if ok else _not_ok(row),
                        ratio(reference_for(row, by_key, default_lookup), row) if ok else "-",
                        *[
                            ratio(peer_for(row, p, by_key, default_lookup), row)
                            if ok and row["implementation"] != p
                            else "-"
                            for p in peers
                        ],
                    ]
                )
            out += ["", _describe_setting(subset[0]["setting"])[:width], *_align(table, width)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _setting_names(rows: list[dict], device: str) -> list[str]:
    names = []
    for r in rows:
        if r["device"] == device and r["setting"]["name"] not in names:
            names.append(r["setting"]["name"])
    return names


def _describe_setting(s: dict) -> str:
    extra = f", {s['distribution']}" if s.get("distribution") else ""
    return (
        f"{s['name']}: B={s['batch']} D={s['channels']} {s['height']}x{s['width']} G={s['groups']} "
        f"d={s['channels'] // s['groups']} V={s['codebook_size']:,}{extra}"
    )


def _align(table: list[list[str]], width: int) -> list[str]:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])] + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip()[:width])
    return lines


# ------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(run: dict, device: str, out: Path, tag: str) -> list[Path]:
    rows = [
        r
        for r in run["rows"]
        if r["device"] == device and r["setting"]["name"].startswith("V-sweep") and r["status"] != "unsupported"
    ]
    if not rows:
        return []
    plt = _pyplot()
    series = defaultdict(list)
    for r in rows:
        series[(label(r), r["mode"])].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, mode), points in sorted(series.items()):
        points.sort(key=lambda r: r["setting"]["codebook_size"])
        ok = [p for p in points if p["status"] == "ok"]
        if not ok:
            continue
        style = "-o" if mode == "forward_backward" else "--s"
        (line,) = axes[0].plot(
            [p["setting"]["codebook_size"] for p in ok],
            [p["median_s"] for p in ok],
            style,
            label=f"{name} {MODE_NAMES[mode]}",
        )
        axes[1].plot(
            [p["setting"]["codebook_size"] for p in ok],
            [max(p.get("peak_extra_bytes") or 1, 1) / 2**20 for p in ok],
            style,
            color=line.get_color(),
        )
        for p in points:
            if p["status"] == "oom":
                height = max(ok[-1].get("peak_extra_bytes") or 1, 1) / 2**20
                axes[1].annotate("OOM", (p["setting"]["codebook_size"], height), color=line.get_color(), fontsize=8)
    for ax, ylabel in zip(axes, ("median time (s)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size V")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    s = rows[0]["setting"]
    fig.suptitle(
        f"{device}: latent ({s['batch']}, {s['channels']}, {s['height']}, {s['width']}), G={s['groups']}, "
        f"d={s['channels'] // s['groups']}; time and memory vs V"
    )
    fig.tight_layout()
    path = out / f"benchmark-{tag}-v-sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_settings(run: dict, device: str, out: Path, tag: str, mode: str = "forward_backward") -> list[Path]:
    """Bars of `mode`'s median time and peak memory per implementation, one group per setting."""
    rows = [
        r
        for r in run["rows"]
        if r["device"] == device
        and r["mode"] == mode
        and r["status"] in ("ok", "oom")
        and not r["setting"]["name"].startswith(tuple(prefix for prefix, _ in SWEEPS))
    ]
    if not rows:
        return []
    plt = _pyplot()
    names = _setting_names(rows, device)
    labels = sorted(
        {label(r) for r in rows},
        key=lambda n: _order({"mode": mode, "implementation": n.split(":")[0], "lookup": n.partition(":")[2]}),
    )
    by = {(r["setting"]["name"], label(r)): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    bar = 0.8 / max(len(labels), 1)
    for i, name in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * bar for j in range(len(names))]
        cells = [by.get((setting, name)) for setting in names]
        times = [c["median_s"] if c and c["status"] == "ok" else 0 for c in cells]
        memory = [(c.get("peak_extra_bytes") or 0) / 2**20 if c and c["status"] == "ok" else 0 for c in cells]
        bars = axes[0].bar(xs, times, bar, label=name)
        axes[1].bar(xs, memory, bar, label=name)
        for x, c in zip(xs, cells):
            if c and c["status"] == "oom":  # no bar: say why at the foot of the axis
                for ax in axes:
                    ax.text(
                        x,
                        0.02,
                        "OOM",
                        transform=ax.get_xaxis_transform(),
                        rotation=90,
                        fontsize=7,
                        ha="center",
                        va="bottom",
                        color=bars.patches[0].get_facecolor(),
                    )
    for ax, ylabel in zip(axes, (f"{MODE_NAMES[mode]} median time (s)", "peak extra memory (MiB)")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8, rotation=15, ha="right")
        if any(patch.get_height() > 0 for patch in ax.patches):
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{device}: {MODE_NAMES[mode]} per setting (log scale; OOM: did not fit)")
    fig.tight_layout()
    path = out / f"benchmark-{tag}-settings.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ------------------------------------------------------------------------------------------------
# Documents


def _machine_lines(run: dict, device: str) -> list[str]:
    info = run["machine"].get(device, {})
    lines = [
        f"- {info.get('cores')} CPU cores, torch {info.get('torch')}, threads {info.get('torch_threads')}, "
        f"gsq CPU kernels: {info.get('gsq_cpu_kernels')}; run {run['datetime']} ({run['source']})",
        f"- float32 matmul rate (TF32 off): {info.get('matmul_gflops') or float('nan'):.0f} GFLOP/s"
        + (
            f"; fp32 FMA peak {info['fp32_peak_gflops']:.0f} GFLOP/s ({info.get('fp32_peak_basis', '')})"
            if info.get("fp32_peak_gflops")
            else ""
        )
        + f"; load average at start: {info.get('load_average_at_start')}",
    ]
    for key in ("triton", "cuda_runtime", "driver", "sm_count", "compute_capability"):
        if info.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {info[key]}")
    return lines


def render_device(run: dict, device: str, previous: dict, plots: list[Path], prefix: str = "") -> list[str]:
    info = run["machine"].get(device, {})
    parts = [f"## {device.upper()}: {info.get('gpu', info.get('cpu', ''))}", "", *_machine_lines(run, device), ""]
    rows = [r for r in run["rows"] if r["device"] == device]
    settings = [r for r in rows if not r["setting"]["name"].startswith(tuple(prefix for prefix, _ in SWEEPS))]
    for name in _setting_names(settings, device):
        s = next(r["setting"] for r in rows if r["setting"]["name"] == name)
        parts += [f"### {_describe_setting(s)}", "", setting_table(run, device, name, previous), ""]
    for sweep, axis in SWEEPS:
        for mode in ("lookup", "forward_backward"):
            if any(r["setting"]["name"].startswith(sweep) and r["mode"] == mode for r in rows):
                parts += [
                    f"### {sweep}, {MODE_NAMES[mode]} (time (speed-up) / peak extra memory)",
                    "",
                    sweep_table(run, device, sweep, axis, mode),
                    "",
                ]
    if run.get("training") and (device == "cuda" or run.get("dry_run")):
        parts += [
            "### Training steps (bf16 autocast on a GPU, DINO discriminator from local random weights)",
            "",
            training_table(run["training"]),
            "",
        ]
    if run.get("checks") and (device == "cuda" or run.get("dry_run")):
        parts += ["### GPU check verdicts", "", checks_table(run["checks"]), ""]
    parts += [f"![{path.stem}]({prefix}{path.name})" for path in plots] + ([""] if plots else [])
    skipped = sorted(
        {
            f"{label(r)} {MODE_NAMES.get(r['mode'], r['mode'])}: {r.get('reason', '')}"
            for r in rows
            if r["status"] == "unsupported"
        }
    )
    if skipped:
        parts += ["Not run:", ""] + [f"- {reason}" for reason in skipped] + [""]
    return parts


def render(entries: list[tuple[dict, str, dict]], plots: dict) -> str:
    """benchmarks.md for [(run, device, previous rows by key)], in the order given."""
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.report` from `pytest benchmarks/ --benchmark-only` runs and "
        "`python -m benchmarks.gpu_check` runs (benchmarks/results/). Medians; speed-ups against the "
        "reference in the same run (same lookup mode where the reference was timed in it); peak extra "
        "memory (CPU: resident set of a forked child; GPU: torch.cuda.max_memory_allocated over the call); "
        "GFLOP/s count 2*d flops per (group vector, code) pair, beside the machine's float32 matmul rate "
        "and, on a GPU, its fp32 FMA peak. OOM: the case exceeded the memory budget or the GPU.",
        "",
    ]
    for run, device, previous in entries:
        parts += render_device(run, device, previous, plots.get((id(run), device), []))
    return "\n".join(parts)


def _devices(run: dict) -> list[str]:
    return sorted({r["device"] for r in run["rows"]}, key=lambda d: (d != "cpu", d))


def readme_section(entries: list[tuple[dict, str, dict]], plots: dict, docs_prefix: str) -> str:
    lines = [README_START, ""]
    for run, device, _ in entries:
        info = run["machine"].get(device, {})
        core = next(
            (r["setting"] for r in run["rows"] if r["device"] == device and r["setting"]["name"] == "core-target"), None
        )
        if core is None:
            continue
        lines += [
            f"Latest run on {info.get('gpu', info.get('cpu'))} ({info.get('cores')} cores, torch "
            f"{info.get('torch')}, float32 matmul {info.get('matmul_gflops') or 0:.0f} GFLOP/s), "
            f"{_describe_setting(core)}; full tables in [docs/benchmarks.md]({docs_prefix}benchmarks.md):",
            "",
            setting_table(run, device, "core-target", {}),
            "",
        ]
        lines += [f"![{p.stem}]({docs_prefix}{p.name})" for p in plots.get((id(run), device), [])]
        lines.append("")
    lines.append(README_END)
    return "\n".join(lines)


README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def write_plots(entries: list[tuple[dict, str, dict]], out: Path) -> dict:
    """{(id(run), device): [PNG paths]}, named after the device kind (numbered when two runs share one)."""
    plots, seen = {}, defaultdict(int)
    for run, device, _ in entries:
        kind = device_kind(run["machine"], device)
        seen[kind] += 1
        tag = kind if seen[kind] == 1 else f"{kind}-{seen[kind]}"
        plots[(id(run), device)] = plot_settings(run, device, out, tag) + plot_sweep(run, device, out, tag)
    return plots


# ------------------------------------------------------------------------------------------------
# Command line


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def tracked_results() -> list[tuple[dict, str]]:
    """(run, device) of every run saved in benchmarks/results/, CPU kinds first."""
    found = []
    for path in sorted(RESULTS.glob("*.json")):
        run = load(path)
        found += [(run, device) for device in _devices(run) if device_kind(run["machine"], device) == path.stem]
    return sorted(found, key=lambda entry: (entry[1] != "cpu", device_kind(entry[0]["machine"], entry[1])))


def update_docs(paths: list[Path], runs: list[dict]) -> list[Path]:
    """Saves each run as benchmarks/results/<device kind>.json, then rebuilds docs/benchmarks.md, its
    plots (docs/benchmark-*.png; ones no run produces any more are removed) and README.md's benchmark
    section from every saved run. Returns the files written."""
    previous, written = {}, []
    for path, run in zip(paths, runs):
        if run["dry_run"]:
            raise SystemExit(f"{path}: a --dry-run result (CPU stand-ins) cannot update the docs")
        for device in _devices(run):
            target = RESULTS / f"{device_kind(run['machine'], device)}.json"
            if target.is_file():
                previous[target.stem] = {_key(r): r for r in load(target)["rows"] if r["device"] == device}
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written.append(target)
    entries = [
        (run, device, previous.get(device_kind(run["machine"], device), {})) for run, device in tracked_results()
    ]
    DOCS.mkdir(parents=True, exist_ok=True)
    plots = write_plots(entries, DOCS)
    fresh = {p for ps in plots.values() for p in ps}
    for stale in set(DOCS.glob("benchmark-*.png")) - fresh:  # plots of an earlier layout or device kind
        stale.unlink()
    (DOCS / "benchmarks.md").write_text(render(entries, plots) + "\n")
    text = README.read_text()
    section = readme_section(entries, plots, "docs/")
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + section + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Benchmarks\n\n" + section + "\n"
    README.write_text(text)
    return written + [DOCS / "benchmarks.md", README] + [p for ps in plots.values() for p in ps]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "results", type=Path, nargs="+", help="pytest-benchmark JSON (--benchmark-json) or a GPU check's results.json"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"folder for benchmarks.md and the plots (default {os.path.relpath(DEFAULT_OUT, ROOT)}, "
        "not tracked); ignored with --update-docs",
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the tracked docs/benchmarks.md and plots, README.md's benchmark section and "
        "benchmarks/results/<device kind>.json",
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the compact summary")
    args = parser.parse_args(argv)

    runs = []
    for path in args.results:
        if not path.is_file():
            parser.error(f"{path} does not exist")
        run = load(path)
        if not run["rows"]:
            parser.error(f"{path}: no gsq benchmark results in this file")
        runs.append(run)
    if not args.quiet:
        for run in runs:
            print(compact_summary(run))
    if args.update_docs:
        for path in update_docs(args.results, runs):
            print(f"wrote {path}")
        return
    if any(_inside(args.out, folder) for folder in TRACKED):
        parser.error(
            f"--out {args.out} is tracked in git: pass --update-docs to rewrite the docs, or choose another folder"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    entries = [(run, device, {}) for run in runs for device in _devices(run)]
    plots = write_plots(entries, args.out)
    (args.out / "benchmarks.md").write_text(render(entries, plots) + "\n")
    print(
        f"wrote {args.out / 'benchmarks.md'}"
        + "".join(f", {p}" for ps in plots.values() for p in ps)
        + " (tracked docs untouched; --update-docs rewrites them)"
    )


if __name__ == "__main__":
    main()
