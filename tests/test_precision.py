"""`train.precision: auto` depends on what the device is, never on how loaded it is (issue 11, case 8)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vgen.train import precision as P

CPU = torch.device("cpu")


def _no_timing(*args, **kwargs):
    raise AssertionError("auto precision timed a matmul on a CPU whose instruction set is known")


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, True, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_x86_cpus_are_decided_by_their_instructions(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(P.torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(P.torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(P, "bf16_speedup", _no_timing)
    chosen, why = P.choose_precision("auto", CPU, 192)
    assert chosen == expected and why.startswith("auto: CPU has")


def test_cpuinfo_flags_decide_when_torch_cannot_say(monkeypatch):
    monkeypatch.setattr(P.platform, "machine", lambda: "x86_64")
    monkeypatch.delattr(P.torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(P, "bf16_speedup", _no_timing)
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx2", "avx512f", "amx_bf16", "amx_tile"})
    assert P.choose_precision("auto", CPU, 192)[0] == "bf16"
    monkeypatch.setattr(P, "_cpuinfo_flags", lambda: {"avx2", "fma"})
    assert P.choose_precision("auto", CPU, 192)[0] == "fp32"


def test_only_an_unknown_cpu_falls_back_to_timing(monkeypatch):
    monkeypatch.setattr(P.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(P, "bf16_speedup", lambda width: 2.0)
    chosen, why = P.choose_precision("auto", CPU, 192)
    assert chosen == "bf16" and "aarch64" in why and "measured 2.0x" in why
    monkeypatch.setattr(P, "bf16_speedup", lambda width: 0.5)
    assert P.choose_precision("auto", CPU, 192)[0] == "fp32"


def test_an_explicit_precision_is_kept():
    assert P.choose_precision("fp32", CPU, 192) == ("fp32", "set in the config")
    assert P.choose_precision("bf16", CPU, 192)[0] == "bf16"


def test_this_machine_gets_the_same_answer_under_load(monkeypatch):
    """The measurement this replaced picked fp32 on an AMX CPU when other processes were running."""
    native, _ = P.cpu_bf16_instructions()
    if native is None:
        pytest.skip("a CPU of unknown kind: the documented timing fallback applies")
    monkeypatch.setattr(P, "bf16_speedup", _no_timing)
    idle = P.choose_precision("auto", CPU, 192)
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = [P.choose_precision("auto", CPU, 192) for _ in range(3)]
    finally:
        burner.kill()
        burner.wait()
    assert loaded == [idle] * 3 and idle[0] == ("bf16" if native else "fp32")
