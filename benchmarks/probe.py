"""Peak memory of one benchmark case, in a fresh process: `python -m benchmarks.probe '<json>'`.

CPU: the peak resident set (VmHWM, reset just before the call) minus the resident set just before
it, i.e. what the call itself adds. The address space is capped at (current + budget), so a case
that needs more fails its allocation and is reported as out of memory instead of pushing the
machine into swap or the OOM killer. GPU: torch.cuda.max_memory_allocated minus what was allocated
before the call. Prints one JSON line: {"status": "ok"|"oom"|"error", "peak_extra_bytes": ..., ...}.

`python -m benchmarks.probe --serve` is the same for many CPU cases at a lower cost: it imports
torch once, then reads one JSON spec per line and forks a child per spec, which measures the case
exactly as above (VmHWM reset in the child, address space capped in the child) and dies. Starting
Python and torch costs about 5 s per probe; a fork costs milliseconds. The server itself never runs
an operator, so no OpenMP or CUDA state exists to be inherited across fork. CUDA cases always use
a fresh process.
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
    return (
        isinstance(error, MemoryError)
        or "out of memory" in text
        or "can't allocate" in text
        or "cannot allocate" in text
        or "bad_alloc" in text
        or "failed to allocate" in text
    )


def run(spec: dict) -> dict:
    import torch

    from .implementations import make_case
    from .shapes import Setting

    setting = Setting(**spec["setting"])
    device = spec["device"]
    fn = make_case(spec["implementation"], spec["mode"], setting, device, lookup=spec.get("lookup"))
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
    except BaseException as error:  # allocation failures surface as many types
        if _is_out_of_memory(error):
            return {
                "status": "oom",
                "error": f"needs more than the {budget / 2**30:.1f} GiB budget: {str(error).splitlines()[0][:200]}",
            }
        return {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
    peak = (_status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    result["peak_extra_bytes"] = max(0, peak - before)
    result["peak_rss_bytes"] = peak
    return result


def run_forked(spec: dict, timeout: float = 1800.0) -> dict:
    """run(spec) in a forked child; a child killed by the kernel counts as out of memory."""
    import os
    import select
    import signal

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report through the pipe, leave without any cleanup
        os.close(read_end)
        try:
            result = run(spec)
        except BaseException as error:  # anything becomes an "error" result
            result = {"status": "error", "error": f"{type(error).__name__}: {error}"[:500]}
        os.write(write_end, (json.dumps(result) + "\n").encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode().strip()
    if text:
        return json.loads(text.splitlines()[-1])
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return {"status": "oom", "error": "killed (out of memory)"}
    return {"status": "error", "error": f"probe child ended with status {status} and no result"}


def serve() -> None:
    import torch  # noqa: F401 - imported once, before any fork

    from . import implementations  # noqa: F401

    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run_forked(json.loads(line))), flush=True)


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    spec = json.loads(sys.argv[1])
    print(json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
