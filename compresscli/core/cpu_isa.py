"""Keep oneDNN off AMX where the CPU advertises it but the machine does not let it run.

Some virtual machines pass the host's CPUID through (amx_tile, amx_bf16 in /proc/cpuinfo, the kernel's
XSAVE support and permission all say yes) while executing an AMX instruction still traps: oneDNN then
picks AMX for every bf16 matmul and the process dies of SIGILL, in the middle of a run on a bf16
checkpoint. Whether AMX runs is probed once per machine ($COMPRESSCLI_CACHE/amx-probe.json), in a subprocess that does a bf16 matmul with
plain torch, and remembered; where it does not, oneDNN is capped at the ISA below AMX
(ONEDNN_MAX_CPU_ISA, read at its first matmul), which changes speed only. A user who sets
ONEDNN_MAX_CPU_ISA decides for themselves and no probe runs.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

from compresscli.core.cache import cache_dir

log = logging.getLogger(__name__)

BELOW_AMX = "AVX512_CORE_FP16"
PROBE = ("import torch; torch.nn.functional.linear(torch.ones(4, 32, dtype=torch.bfloat16), "
         "torch.ones(48, 32, dtype=torch.bfloat16))")


def _cpu() -> tuple[str, set[str]]:
    """The CPU's model name and flags, from /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in text.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", ""), set(fields.get("flags", "").split())


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty off Linux): what a kernel build may use."""
    return _cpu()[1]


def amx_runs() -> bool:
    """Whether a bf16 matmul on AMX survives here: probed once per CPU model and kernel, then cached."""
    model, _ = _cpu()
    key = f"{model} | {platform.release()}"
    path = cache_dir() / "amx-probe.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), bool):
        return known[key]
    try:
        runs = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return True  # no verdict: leave oneDNN alone, as it would be without compresscli
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: runs}))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs the probe again next time
    return runs


def avoid_unusable_amx() -> None:
    """Cap oneDNN below AMX when the CPU advertises AMX that does not run (see the module docstring)."""
    if "ONEDNN_MAX_CPU_ISA" in os.environ or "amx_bf16" not in _cpu()[1]:
        return
    if not amx_runs():
        os.environ["ONEDNN_MAX_CPU_ISA"] = BELOW_AMX
        log.info("this CPU advertises AMX but executing it fails: oneDNN capped at %s", BELOW_AMX)
