"""benchmarks/hardware.py: the scenario benchmarks' --device and --dtype reach the loaded base and every stage's settings."""

import argparse

import pytest

from benchmarks import hardware


def test_load_puts_the_base_on_the_device_in_the_dtype_and_of_names_them(tiny_dir):
    assert hardware.of(hardware.load(str(tiny_dir / "base"))) == ("cpu", "float32")  # auto on the CPU
    assert hardware.of(hardware.load(str(tiny_dir / "base"), "cpu", "bfloat16")) == ("cpu", "bfloat16")


def test_the_flags_default_to_this_machine_and_refuse_an_unknown_dtype():
    ap = argparse.ArgumentParser()
    hardware.add_args(ap)
    a = ap.parse_args([])
    assert (a.device, a.dtype) == ("cpu", "auto")
    assert ap.parse_args(["--device", "cuda", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        ap.parse_args(["--dtype", "float8"])
