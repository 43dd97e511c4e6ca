"""The AMX probe: a CPU that advertises AMX which traps gets oneDNN capped below it, once per machine."""
from __future__ import annotations

import json

from compresscli.core import cpu_isa

TRAPS = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"


def test_a_trapping_probe_caps_onednn_and_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSCLI_CACHE", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_isa, "_cpu", lambda: ("Some Xeon", {"avx512f", "amx_tile", "amx_bf16"}))
    monkeypatch.setattr(cpu_isa, "PROBE", TRAPS)
    cpu_isa.avoid_unusable_amx()
    assert cpu_isa.os.environ["ONEDNN_MAX_CPU_ISA"] == cpu_isa.BELOW_AMX
    assert list(json.loads((tmp_path / "amx-probe.json").read_text()).values()) == [False]
    monkeypatch.setattr(cpu_isa, "PROBE", "raise SystemExit(0)")  # the verdict is cached: no second probe
    assert cpu_isa.amx_runs() is False


def test_no_probe_without_amx_or_when_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSCLI_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_isa, "PROBE", TRAPS)
    monkeypatch.setattr(cpu_isa, "_cpu", lambda: ("Some Xeon", {"avx512f", "amx_tile", "amx_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cpu_isa.avoid_unusable_amx()
    assert cpu_isa.os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(cpu_isa, "_cpu", lambda: ("Some EPYC", {"avx512f", "avx512_bf16"}))
    cpu_isa.avoid_unusable_amx()
    assert "ONEDNN_MAX_CPU_ISA" not in cpu_isa.os.environ and not (tmp_path / "amx-probe.json").exists()
