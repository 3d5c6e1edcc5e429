"""Turn a pytest-benchmark JSON into docs/benchmarks.md, PNG plots, a tracked results file and the
README's benchmark section.

    pytest benchmarks/ --benchmark-only --benchmark-json=run.json
    python -m benchmarks.report run.json --out docs --save-results --readme README.md

Times are medians. Speed-ups divide the reference's median by each implementation's, both taken in
the same run. GFLOP/s count 2*d flops per (group vector, code) pair of the lookup, whatever the mode,
beside the machine's float32 matmul rate measured at the start of the run. "OOM" marks a case whose
peak memory exceeded the probe's budget (benchmarks/probe.py): a result, not a crash.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("lookup", "forward", "forward_backward")
MODE_NAMES = {"lookup": "lookup", "forward": "forward", "forward_backward": "fwd+bwd"}
IMPL_ORDER = ("reference", "reference-compiled", "cpu", "cuda", "triton", "vqtorch", "faiss")


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "implementation" not in info:
            continue
        rows.append({**info, "median_s": bench["stats"]["median"], "status": "ok"})
    for entry in data.get("gsq_not_run", []):
        rows.append({**entry, "status": entry["status"]})
    return {"rows": rows, "machine": data.get("gsq_machine", {}), "datetime": data.get("datetime", "")}


def device_kind(machine: dict, device: str) -> str:
    info = machine.get(device, {})
    if device == "cuda":
        return "gpu-" + info.get("gpu", "unknown").lower().replace(" ", "-")
    return f"cpu-{info.get('cores', '?')}core-{info.get('gsq_cpu_kernels', 'unknown')}"


def _key(row: dict) -> tuple:
    return (row["device"], row["setting"]["name"], row["mode"], row["implementation"])


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _cell(row: dict | None, reference: dict | None, previous: dict | None) -> dict:
    if row is None:
        return {"time": "-", "speedup": "-", "memory": "-", "gflops": "-", "vs_previous": "-"}
    if row["status"] != "ok":
        label = "OOM" if row["status"] == "oom" else "n/a"
        return {"time": label, "speedup": "-", "memory": label, "gflops": "-", "vs_previous": "-"}
    speedup = "-"
    if reference is not None and reference["status"] == "ok":
        speedup = f"{reference['median_s'] / row['median_s']:.1f}x"
    gflops = row["lookup_flops"] / row["median_s"] / 1e9
    vs_previous = "-"
    if previous is not None and previous.get("status") == "ok":
        vs_previous = f"{previous['median_s'] / row['median_s']:.2f}x"
    return {"time": _fmt_time(row["median_s"]), "speedup": speedup, "memory": _fmt_bytes(row["peak_extra_bytes"]),
            "gflops": f"{gflops:.1f} ({100 * gflops / row['matmul_gflops']:.0f}%)", "vs_previous": vs_previous}


def setting_table(rows: list[dict], device: str, setting_name: str, previous: dict) -> str:
    by_key = {_key(r): r for r in rows}
    impls = [i for i in IMPL_ORDER if any(_key(r)[:2] == (device, setting_name) and r["implementation"] == i
                                          and not (r["status"] == "unsupported") for r in rows)]
    lines = ["| implementation | mode | time (median) | speed-up vs reference | peak extra memory | "
             "GFLOP/s (% of matmul) | vs previous run |", "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        reference = by_key.get((device, setting_name, mode, "reference"))
        for impl in impls:
            row = by_key.get((device, setting_name, mode, impl))
            if row is None or row["status"] == "unsupported":
                continue
            cell = _cell(row, reference, previous.get((device, setting_name, mode, impl)))
            lines.append(f"| {impl} | {MODE_NAMES[mode]} | {cell['time']} | {cell['speedup']} | {cell['memory']} | "
                         f"{cell['gflops']} | {cell['vs_previous']} |")
    return "\n".join(lines)


def sweep_table(rows: list[dict], device: str, prefix: str, axis: str, mode: str) -> str:
    by_key = {_key(r): r for r in rows}
    settings = sorted({r["setting"]["name"] for r in rows if r["device"] == device and r["setting"]["name"].startswith(prefix)},
                      key=lambda n: int(n.rsplit("-", 1)[1]))
    impls = [i for i in IMPL_ORDER if any(r["implementation"] == i and r["device"] == device and r["mode"] == mode
                                          and r["setting"]["name"].startswith(prefix) and r["status"] != "unsupported"
                                          for r in rows)]
    header = f"| {axis} | " + " | ".join(f"{i} time / memory" for i in impls) + " |"
    lines = [header, "|" + "---|" * (len(impls) + 1)]
    for name in settings:
        cells = []
        reference = by_key.get((device, name, mode, "reference"))
        for impl in impls:
            cell = _cell(by_key.get((device, name, mode, impl)), reference, None)
            extra = f" ({cell['speedup']})" if impl != "reference" and cell["speedup"] != "-" else ""
            cells.append(f"{cell['time']}{extra} / {cell['memory']}")
        lines.append(f"| {name.rsplit('-', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], device: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    series = defaultdict(list)
    for r in rows:
        if r["device"] != device or not r["setting"]["name"].startswith("V-sweep") or r["status"] == "unsupported":
            continue
        series[(r["implementation"], r["mode"])].append(r)
    if not series:
        return files
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (impl, mode), points in sorted(series.items()):
        points.sort(key=lambda r: r["setting"]["codebook_size"])
        ok = [p for p in points if p["status"] == "ok"]
        oom = [p for p in points if p["status"] == "oom"]
        style = "-o" if mode == "forward_backward" else "--s"
        label = f"{impl} {MODE_NAMES[mode]}"
        if ok:
            line, = axes[0].plot([p["setting"]["codebook_size"] for p in ok], [p["median_s"] for p in ok], style, label=label)
            axes[1].plot([p["setting"]["codebook_size"] for p in ok], [max(p["peak_extra_bytes"], 1) / 2**20 for p in ok],
                         style, color=line.get_color(), label=label)
            for p in oom:
                axes[1].annotate("OOM", (p["setting"]["codebook_size"], max(ok[-1]["peak_extra_bytes"], 1) / 2**20),
                                 color=line.get_color(), fontsize=8)
    for ax, ylabel in zip(axes, ("median time (s)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("codebook size V")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    example = next(r for r in rows if r["device"] == device and r["setting"]["name"].startswith("V-sweep"))
    s = example["setting"]
    fig.suptitle(f"{device}: latent ({s['batch']}, {s['channels']}, {s['height']}, {s['width']}), G={s['groups']}, "
                 f"d={s['channels'] // s['groups']}; time and memory vs V")
    fig.tight_layout()
    path = out / f"benchmark-{device}-v-sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files.append(path)
    return files


def render(run: dict, previous: dict, out: Path, plots: dict) -> str:
    rows = run["rows"]
    parts = ["# Benchmarks", "",
             "Generated by `python -m benchmarks.report` from a `pytest benchmarks/ --benchmark-only` run "
             f"({run['datetime']}). Medians; speed-ups against the reference in the same run; peak extra "
             "memory measured in a separate process per case (CPU: resident set of a forked child; GPU: "
             "max_memory_allocated); GFLOP/s count 2*d flops per (group vector, code) pair, beside the "
             "machine's float32 matmul rate. OOM: the case exceeded the memory budget.", ""]
    for device in sorted({r["device"] for r in rows}):
        info = run["machine"].get(device, {})
        parts += [f"## {device.upper()}: {info.get('gpu', info.get('cpu', ''))}", "",
                  f"- cores: {info.get('cores')}, torch {info.get('torch')}, threads {info.get('torch_threads')}, "
                  f"gsq CPU kernels: {info.get('gsq_cpu_kernels')}",
                  f"- float32 matmul rate: {info.get('matmul_gflops', float('nan')):.0f} GFLOP/s; load average at "
                  f"start: {info.get('load_average_at_start')}", ""]
        names = []
        for r in rows:
            name = r["setting"]["name"]
            if r["device"] == device and not name.startswith(("V-sweep", "d-sweep")) and name not in names:
                names.append(name)
        for name in names:
            example = next(r for r in rows if r["device"] == device and r["setting"]["name"] == name)
            s = example["setting"]
            parts += [f"### {name}: latent ({s['batch']}, {s['channels']}, {s['height']}, {s['width']}), "
                      f"G={s['groups']}, d={s['channels'] // s['groups']}, V={s['codebook_size']:,}", "",
                      setting_table(rows, device, name, previous), ""]
        for prefix, axis in (("V-sweep", "V"), ("d-sweep", "d")):
            for mode in ("lookup", "forward_backward"):
                if any(r["device"] == device and r["setting"]["name"].startswith(prefix) and r["mode"] == mode for r in rows):
                    parts += [f"### {prefix}, {MODE_NAMES[mode]} (time (speed-up) / peak extra memory)", "",
                              sweep_table(rows, device, prefix, axis, mode), ""]
        for path in plots.get(device, []):
            parts += [f"![{path.stem}]({path.name})", ""]
        skipped = [r for r in rows if r["device"] == device and r["status"] == "unsupported"]
        if skipped:
            reasons = sorted({f"{r['implementation']} {MODE_NAMES[r['mode']]}: {r['reason']}" for r in skipped})
            parts += ["Not run:", ""] + [f"- {reason}" for reason in reasons] + [""]
    return "\n".join(parts)


def previous_results(run: dict) -> dict:
    previous = {}
    for device in {r["device"] for r in run["rows"]}:
        path = RESULTS / f"{device_kind(run['machine'], device)}.json"
        if path.is_file():
            previous.update({_key(r): r for r in load(path)["rows"] if r["device"] == device})
    return previous


README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def readme_section(run: dict, plots: dict, docs_prefix: str) -> str:
    lines = [README_START, ""]
    for device in sorted({r["device"] for r in run["rows"]}):
        info = run["machine"].get(device, {})
        core = "core-target"
        lines += [f"Latest run on {info.get('gpu', info.get('cpu'))} ({info.get('cores')} cores, torch "
                  f"{info.get('torch')}, float32 matmul {info.get('matmul_gflops', 0):.0f} GFLOP/s), latent "
                  "(32, 64, 16, 16), G=16, V=16,384; full tables in "
                  f"[docs/benchmarks.md]({docs_prefix}benchmarks.md):", "",
                  setting_table(run["rows"], device, core, {}), ""]
        for path in plots.get(device, []):
            lines += [f"![{path.stem}]({docs_prefix}{path.name})", ""]
    lines.append(README_END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for benchmarks.md and the plots")
    parser.add_argument("--save-results", action="store_true",
                        help="also copy the run to benchmarks/results/<device-kind>.json (tracked)")
    parser.add_argument("--readme", type=Path, default=None, help="replace the README's benchmark section")
    args = parser.parse_args(argv)

    run = load(args.results)
    if not run["rows"]:
        raise SystemExit(f"{args.results}: no gsq benchmark results in this file")
    args.out.mkdir(parents=True, exist_ok=True)
    previous = previous_results(run)
    plots = {device: plot_sweep(run["rows"], device, args.out) for device in {r["device"] for r in run["rows"]}}
    (args.out / "benchmarks.md").write_text(render(run, previous, args.out, plots) + "\n")
    print(f"wrote {args.out / 'benchmarks.md'}" + "".join(f", {p}" for ps in plots.values() for p in ps))
    if args.save_results:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for device in {r["device"] for r in run["rows"]}:
            target = RESULTS / f"{device_kind(run['machine'], device)}.json"
            shutil.copyfile(args.results, target)
            print(f"saved {target}")
    if args.readme:
        text = args.readme.read_text()
        section = readme_section(run, plots, "docs/")
        if README_START in text and README_END in text:
            head, rest = text.split(README_START, 1)
            text = head + section + rest.split(README_END, 1)[1]
        else:
            text = text.rstrip() + "\n\n## Benchmarks\n\n" + section + "\n"
        args.readme.write_text(text)
        print(f"updated {args.readme}")


if __name__ == "__main__":
    main()
