"""What `capsfuse-lite bench` measures about the machine itself: per-configuration peak RSS
(VmHWM reset + a sampling thread on VmRSS), GPU memory through nvidia-smi, how busy other
processes kept the CPU during a timed pass, a description of the machine for the report, and the
default thread count every llama.cpp user here shares.
Linux /proc based; each figure is None where the platform cannot give it.
"""

from __future__ import annotations

import gc
import os
import platform
import shutil
import subprocess
import threading
import time


def default_threads() -> int:
    """CPU threads for llama.cpp by default: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of RAM the kernel says can be allocated without swapping (MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_MIB = 1024 * 1024


def _proc_status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB ({} where there is no /proc)."""
    out = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _gpu_memory_mib() -> tuple[float, str] | None:
    """GPU memory held by this process (or, where nvidia-smi cannot see our pid, all GPUs' use)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        apps = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout
        mine = [float(p[1]) for p in (l.split(",") for l in apps.splitlines()) if len(p) == 2 and p[0].strip() == str(os.getpid())]
        if mine:
            return sum(mine), "process"
        total = subprocess.run(
            [exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        ).stdout
        return sum(float(v) for v in total.split()), "device"
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class PeakMemory:
    """Peak RSS (and GPU memory) of the process while the ``with`` block runs.

    The kernel's high-water mark is reset on entry, so the peak belongs to this block, and a
    thread samples VmRSS every ``interval`` seconds as a cross-check (and where the reset is not
    available). GPU memory is sampled with nvidia-smi when ``gpu`` is true; "device" scope
    means the whole card's use minus what it used on entry.
    """

    def __init__(self, gpu: bool = False, interval: float = 0.05, gpu_interval: float = 0.5):
        self.gpu, self.interval, self.gpu_interval = gpu, interval, gpu_interval
        self._stop = threading.Event()
        self._rss_start_kib = self._rss_max_kib = 0
        self._gpu_max: float | None = None
        self._gpu_base = 0.0
        self._gpu_scope: str | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        self._hwm_reset = _reset_peak_rss()
        self._rss_start_kib = self._rss_max_kib = _proc_status_kib("VmRSS").get("VmRSS", 0)
        if self.gpu:
            first = _gpu_memory_mib()
            if first is not None:
                self._gpu_scope = first[1]
                self._gpu_base = first[0] if first[1] == "device" else 0.0
        self._thread = threading.Thread(target=self._sample, name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        next_gpu = 0.0
        while True:
            rss = _proc_status_kib("VmRSS").get("VmRSS", 0)
            self._rss_max_kib = max(self._rss_max_kib, rss)
            if self._gpu_scope is not None and time.monotonic() >= next_gpu:
                got = _gpu_memory_mib()
                if got is not None:
                    used = got[0] - self._gpu_base
                    self._gpu_max = used if self._gpu_max is None else max(self._gpu_max, used)
                next_gpu = time.monotonic() + self.gpu_interval
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        status = _proc_status_kib("VmHWM", "VmRSS")
        self._rss_max_kib = max(self._rss_max_kib, status.get("VmRSS", 0))
        if self._hwm_reset:
            self._rss_max_kib = max(self._rss_max_kib, status.get("VmHWM", 0))

    def figures(self) -> dict:
        if self._rss_max_kib:
            rss, scope = self._rss_max_kib / 1024, "configuration" if self._hwm_reset else "sampled"
        else:  # no /proc: the process's lifetime peak is all there is
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rss, scope = (peak / _MIB if platform.system() == "Darwin" else peak / 1024), "process"
        return {
            "peak_rss_mib": round(rss, 1),
            "peak_rss_scope": scope,
            "rss_at_start_mib": round(self._rss_start_kib / 1024, 1) if self._rss_max_kib else None,
            "peak_gpu_mib": None if self._gpu_max is None else round(self._gpu_max, 1),
            "peak_gpu_scope": self._gpu_scope,
        }


def _busy_cpu_s() -> float | None:
    """Seconds all CPUs spent busy since boot (/proc/stat), None where unavailable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user..steal, without guest (already in user)
    return busy / os.sysconf("SC_CLK_TCK")


def _cpu_sample() -> tuple[float, float, float] | None:
    """(monotonic seconds, busy CPU seconds of the whole machine, this process's CPU seconds)."""
    busy = _busy_cpu_s()
    return None if busy is None else (time.monotonic(), busy, _own_cpu_s())


class ThreadGovernor:
    """llama.cpp threads for a CPU run on a shared machine, from the cores other processes leave.

    llama.cpp's CPU threads meet at a barrier after every operation of a decode; when the machine
    has fewer free cores than threads, a thread the kernel preempted holds up all the others at
    every barrier (measured on a 2-core machine with ~1.2 cores busy elsewhere: SmolLM2 1 slot x 3
    beams, 255 ms per decode with 2 threads, 100-113 ms with 1 at a heavier load, 25 ms quiet).
    ``poll()``, called between decode steps, measures the other processes' load over at least
    ``interval`` seconds and returns the thread count to use from now on (the cores they leave,
    rounded, between 1 and ``max_threads``) when it changed, else None. ``sample`` (for tests)
    returns (seconds, machine busy CPU seconds, own CPU seconds)."""

    def __init__(self, max_threads: int, cores: int | None = None, interval: float = 2.0, sample=None):
        self.max_threads = max(1, int(max_threads))
        self.cores = cores or os.cpu_count() or 1
        self.interval = interval
        self._sample = sample or _cpu_sample
        self._last = self._sample()
        self.threads = self.max_threads

    def poll(self) -> int | None:
        now = self._sample()
        if now is None or self._last is None or now[0] - self._last[0] < self.interval:
            return None
        wall = now[0] - self._last[0]
        foreign = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        want = max(1, min(self.max_threads, int(self.cores - foreign + 0.5)))
        if want == self.threads:
            return None
        self.threads = want
        return want


class CpuLoadMeter:
    """How many cores other processes kept busy during the block: the noise indicator."""

    foreign_load: float | None = None

    def __enter__(self) -> "CpuLoadMeter":
        self._busy0, self._own0, self._t0 = _busy_cpu_s(), _own_cpu_s(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        busy1, wall = _busy_cpu_s(), time.monotonic() - self._t0
        if self._busy0 is None or busy1 is None or wall <= 0:
            return
        others = (busy1 - self._busy0) - (_own_cpu_s() - self._own0)
        self.foreign_load = round(max(0.0, others / wall), 2)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def machine_info() -> dict:
    """Where the figures were taken: CPU, cores, memory, llama.cpp build, GPUs."""
    info: dict = {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    mem = _proc_meminfo_kib("MemTotal")
    if mem:
        info["memory_gib"] = round(mem / 1024 / 1024, 1)
    info["python"] = platform.python_version()
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
        info["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except ImportError:
        info["gpu_offload"] = False
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout
            info["gpus"] = [l.strip() for l in out.splitlines() if l.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def _proc_meminfo_kib(key: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
