"""What the machine did while a benchmark ran: a sample every half second of the CPU (all of it, each
process's share, steal, the clock), the disk's reads (MB read, major page faults: a library's page
read from disk at first use), each process's minor page faults (memory touched for the first time),
the page cache's dirty pages, and the GPU (clocks, power, use).

bench/first_job.py reads it per job: on fresh H200 machines the first jobs were 1.2-1.6x slower in
every stage alike, with nothing of qrun's running beside them. This says whether anything else was.

    sampler = ActivitySampler().start()
    ...
    sampler.stop(); sampler.during(start_epoch, end_epoch)
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import defaultdict

PERIOD_S = 0.5
TICK = os.sysconf("SC_CLK_TCK")
GPU_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "utilization.gpu")


def _cpu_jiffies() -> tuple[int, int, int, int]:
    """(busy, iowait, total, steal) jiffies of all CPUs since boot. Steal: time the hypervisor gave
    this VM's CPUs to another guest (counted in busy too)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    return user + nice + system + irq + softirq + steal, iowait, sum(values[:8]), steal


def _process_counters() -> dict[int, tuple[str, int, int]]:
    """pid -> (a short name, utime + stime, minor page faults) of every process now. A minor fault is
    a page mapped without a disk read: mostly memory the process touches for the first time."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        found[int(entry)] = (_label(comm, cmd), int(fields[11]) + int(fields[12]), int(fields[7]))
    return found


def _label(comm: str, cmd: str) -> str:
    """A process's name as a reader would group it: Ray's actors by their title, python by its script."""
    if comm.startswith("kworker"):  # the kernel's worker threads, renamed after the work in hand
        return "kworker"
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    words = cmd.split()
    if comm.startswith("python") and len(words) > 1:
        script = next((w for w in words[1:] if not w.startswith("-")), words[1])
        return f"python {os.path.basename(script)[:40]}"
    return comm


def _disk_reads() -> tuple[float, int]:
    """(MB read from block devices, major page faults) since boot (/proc/vmstat pgpgin is in KiB)."""
    values = {}
    with open("/proc/vmstat") as f:
        for line in f:
            name, value = line.split()
            if name in ("pgpgin", "pgmajfault"):
                values[name] = int(value)
    return values.get("pgpgin", 0) / 1024, values.get("pgmajfault", 0)


def _meminfo_mb(keys=("Dirty", "Writeback", "Cached", "MemAvailable")) -> dict[str, float]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name in keys:
                out[name] = int(value.split()[0]) / 1024
    return out


def _cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return sum(mhz) / len(mhz) if mhz else None
    except OSError:
        return None


class ActivitySampler:
    def __init__(self, period_s: float = PERIOD_S):
        self.period_s = period_s
        self.samples: list[dict] = []  # epoch time, cores busy, iowait cores, top processes, memory, cpu MHz
        self.gpu: list[dict] = []  # epoch time and GPU_FIELDS, from nvidia-smi's own loop
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._smi: subprocess.Popen | None = None

    def start(self) -> "ActivitySampler":
        self._threads.append(threading.Thread(target=self._sample_cpu, daemon=True))
        try:
            self._smi = subprocess.Popen(
                ["nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits",
                 f"-lms={int(self.period_s * 1000)}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._threads.append(threading.Thread(target=self._read_gpu, daemon=True))
        except OSError:
            pass  # no GPU here: the CPU side alone
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
        for thread in self._threads:
            thread.join(timeout=5)

    def _sample_cpu(self) -> None:
        cpus = os.cpu_count() or 1
        last_cpu, last_procs, last_t, last_disk = _cpu_jiffies(), _process_counters(), time.time(), _disk_reads()
        while not self._stop.wait(self.period_s):
            cpu, procs, now, disk = _cpu_jiffies(), _process_counters(), time.time(), _disk_reads()
            total = cpu[2] - last_cpu[2] or 1
            busy, faults = defaultdict(float), defaultdict(int)
            for pid, (label, jiffies, minflt) in procs.items():
                before = last_procs.get(pid)  # a pid new since the last sample started since
                used = jiffies - (before[1] if before else 0)
                if used > 0:
                    busy[label] += used / TICK / (now - last_t)  # cores this label kept busy
                if before:
                    faults[label] += minflt - before[2]
            self.samples.append({"t": now, "cores_busy": cpus * (cpu[0] - last_cpu[0]) / total,
                                 "cores_iowait": cpus * (cpu[1] - last_cpu[1]) / total,
                                 "cores_steal": cpus * (cpu[3] - last_cpu[3]) / total,
                                 "read_mb": disk[0] - last_disk[0], "major_faults": disk[1] - last_disk[1],
                                 "top": sorted(busy.items(), key=lambda kv: -kv[1])[:6],
                                 "minor_faults": sorted(((k, v) for k, v in faults.items() if v), key=lambda kv: -kv[1])[:4],
                                 "cpu_mhz": _cpu_mhz(), **_meminfo_mb()})
            last_cpu, last_procs, last_t, last_disk = cpu, procs, now, disk

    def _read_gpu(self) -> None:
        for line in self._smi.stdout:
            try:
                values = [float(v) for v in line.split(",")]
            except ValueError:
                continue
            self.gpu.append({"t": time.time(), **dict(zip(GPU_FIELDS, values))})

    def during(self, start: float, end: float) -> dict:
        """Means over [start, end] (epoch seconds), the disk's reads in all, and the processes that
        kept the CPU busiest then (mean cores each)."""
        cpu = [s for s in self.samples if start <= s["t"] <= end]
        gpu = [g for g in self.gpu if start <= g["t"] <= end]
        mean = lambda rows, key: (sum(r[key] for r in rows if r.get(key) is not None) / len(rows)) if rows else None  # noqa: E731
        procs, faults = defaultdict(float), defaultdict(int)
        for s in cpu:
            for label, cores in s["top"]:
                procs[label] += cores / len(cpu)
            for label, count in s.get("minor_faults", []):
                faults[label] += count
        return {"samples": len(cpu), "cores_busy": mean(cpu, "cores_busy"), "cores_iowait": mean(cpu, "cores_iowait"),
                "cores_steal": mean(cpu, "cores_steal"),
                "read_mb": sum(s.get("read_mb", 0) for s in cpu), "major_faults": sum(s.get("major_faults", 0) for s in cpu),
                "cpu_mhz": mean(cpu, "cpu_mhz"), "dirty_mb": mean(cpu, "Dirty"), "writeback_mb": mean(cpu, "Writeback"),
                "busiest": [(label, round(cores, 2)) for label, cores in sorted(procs.items(), key=lambda kv: -kv[1])[:6]],
                "minor_faults_by": sorted(faults.items(), key=lambda kv: -kv[1])[:3],
                **{f"gpu_{k}": mean(gpu, k) for k in GPU_FIELDS}}
