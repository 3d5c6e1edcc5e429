"""Peak memory of one benchmark case, in a fresh process: `python -m benchmarks.probe '<json>'`.

CPU: the peak resident set (VmHWM, reset just before the call) minus the resident set just before
it, i.e. what the call itself adds. The address space is capped at (current + budget), so a case
that needs more fails its allocation and is reported as out of memory instead of pushing the
machine into swap or the OOM killer. GPU: torch.cuda.max_memory_allocated minus what was allocated
before the call. Prints one JSON line: {"status": "ok"|"oom"|"error", "peak_extra_bytes": ..., ...}.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate" in text or \
        "cannot allocate" in text or "bad_alloc" in text or "failed to allocate" in text


def run(spec: dict) -> dict:
    import torch

    from .implementations import make_case
    from .shapes import Setting

    setting = Setting(**spec["setting"])
    device = spec["device"]
    fn = make_case(spec["implementation"], spec["mode"], setting, device)
    if spec.get("warmup"):
        fn()  # compilation / autotuning is not the call's memory
    result = {"status": "ok"}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            start = time.perf_counter()
            fn()
            result["seconds"] = time.perf_counter() - start
            result["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
        except torch.OutOfMemoryError as error:
            result = {"status": "oom", "error": str(error).splitlines()[0]}
        return result

    budget = int(spec["budget_bytes"])
    address_space = _status_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (address_space + budget, resource.RLIM_INFINITY))
    before = _status_kb("VmRSS") * 1024
    exact = _reset_peak_rss()
    try:
        start = time.perf_counter()
        fn()
        result["seconds"] = time.perf_counter() - start
    except BaseException as error:  # noqa: BLE001 - allocation failures surface as many types
        if _is_out_of_memory(error):
            return {"status": "oom", "error": f"needs more than the {budget / 2**30:.1f} GiB budget: "
                                              f"{str(error).splitlines()[0][:200]}"}
        return {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
    peak = (_status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    result["peak_extra_bytes"] = max(0, peak - before)
    result["peak_rss_bytes"] = peak
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    print(json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
