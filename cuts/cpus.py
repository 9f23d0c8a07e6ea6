"""How many CPUs this process may use, and the dataloader workers that follows: the cores it is given, a cgroup CPU
quota (v1 or v2), and SLURM's cores per task."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional


def resolve_workers(setting, local_world_size: int) -> int:
    """``data.num_workers``: a number as given, or ``auto``: the cores of this rank less one for its training
    process (at least 1). The cores this process may run on (its affinity, at most a container's CPU quota) are
    shared by the ranks of this machine, unless SLURM runs each rank as a task of its own (as many tasks per
    node as local ranks): then they are the task's, at most its ``--cpus-per-task``."""
    if setting != "auto":
        return int(setting)
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this job was given, not the machine's
    except AttributeError:
        cores = os.cpu_count() or 1
    cores = min(cores, _cpu_quota() or cores)
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    tasks = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # "8" or "8(x2)"
    if per_task.isdigit() and int(per_task) > 0 and tasks.isdigit() and int(tasks) == local_world_size:
        return max(1, min(cores, int(per_task)) - 1)
    return max(1, cores // max(1, local_world_size) - 1)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cpu_quota(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> Optional[int]:
    """The CPUs this process's cgroup CPU quota allows (rounded up), or None without one: cgroup v2's ``cpu.max`` or
    v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, the smallest over the cgroup and its ancestors that are
    mounted here (a container sees its own cgroup as the root)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    folders = []
    for line in lines:  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            folders.append((root / path.lstrip("/"), root))
        elif "cpu" in controllers.split(","):
            mount = next((root / name for name in (controllers, "cpu", "cpu,cpuacct") if (root / name).is_dir()), None)
            if mount is not None:
                folders.append((mount / path.lstrip("/"), mount))
    if not lines:
        folders.append((root, root))
    quotas = [q for folder, top in folders for q in map(_folder_quota, _up_to(folder, top)) if q]
    return max(1, math.ceil(min(quotas))) if quotas else None


def _up_to(folder: Path, top: Path) -> list[Path]:
    """``folder`` and its parents up to ``top``, those that exist."""
    chain = [folder, *folder.parents]
    return [f for f in chain[: chain.index(top) + 1] if f.is_dir()] if top in chain else []


def _folder_quota(folder: Path) -> Optional[float]:
    """The CPUs one cgroup folder's quota allows, or None."""
    try:
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((folder / f"cpu.cfs_{k}_us").read_text().strip() for k in ("quota", "period"))
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
