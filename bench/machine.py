"""What the table was measured on: machine, software versions, date."""

import datetime
import os
import platform
import subprocess

from . import services


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def memory_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def filesystem_of(path: str) -> str:
    """Type and device of the filesystem holding `path` (longest mount prefix)."""
    path = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, fstype, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def vault_revision() -> str:
    """The git revision of the vault code being measured (``--vault-code``, by default this checkout)."""
    code = services.VAULT_CODE
    try:
        rev = subprocess.run(["git", "-C", code, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", code, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    if not rev:
        return "unknown revision"
    return f"git {rev}" + (" with uncommitted changes" if dirty else "")


def load_text(start: tuple | None = None) -> str:
    """The 1-minute load average (other work on the machine skews every figure)."""
    now = os.getloadavg()[0]
    return f"{start[0]:.2f} at the start, {now:.2f} at the end" if start else f"{now:.2f}"


def header_lines(mode: str, runs: int, workdir: str, nginx: str, client: str, rps_client: str,
                 load_at_start=None) -> list[str]:
    import twisted

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"Artifact Vault benchmark, {mode} mode, median of {runs} run{'s' if runs != 1 else ''}, {now}",
        "",
        (f"- machine: {cpu_model()}, {os.cpu_count()} cores, {memory_total()} memory, "
         f"Linux {platform.release()}; files and cache on {filesystem_of(workdir)}"),
        (f"- software: Python {platform.python_version()}, Twisted {twisted.__version__}, nginx {nginx}; "
         f"vault at {vault_revision()}"),
        f"- clients: {client} per big-file transfer; small files: {rps_client}",
        f"- load average (1 min, includes this suite): {load_text(load_at_start)}",
    ]
