"""The GPU verdict: every cause of "an NVIDIA GPU is here but torch cannot use it", from saved outputs."""

from pathlib import Path

from framepack_local.memory.gpu_check import gpu_verdict, parse_nvidia_smi

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia_smi"
RTX3060 = parse_nvidia_smi((FIXTURES / "header_550.txt").read_text(), "NVIDIA GeForce RTX 3060, 550.120, 8.6\n")
RTX5070 = parse_nvidia_smi((FIXTURES / "header_580.txt").read_text(), "NVIDIA GeForce RTX 5070, 580.95.05, 12.0\n")


def test_parsing_saved_outputs():
    assert (RTX3060.gpu_name, RTX3060.driver, RTX3060.cuda, RTX3060.capability) == (
        "NVIDIA GeForce RTX 3060", "550.120", 12.4, (8, 6))
    assert RTX5070.cuda == 13.0 and RTX5070.capability == (12, 0)
    assert parse_nvidia_smi("", "") is None  # no GPU listed
    old_driver = parse_nvidia_smi("Driver Version: 470.1  CUDA Version: 11.4", "Tesla K80, 470.1, [N/A]")
    assert old_driver.capability is None and old_driver.cuda == 11.4


def test_each_cause_gets_its_sentence_and_fix():
    assert gpu_verdict(None, None, False) is None  # no NVIDIA GPU: nothing to say (the page starts small)
    assert gpu_verdict(RTX3060, "12.6", True) is None  # works
    cpu_wheel = gpu_verdict(RTX3060, None, False)
    assert "CPU build" in cpu_wheel and "run ./run.sh again" in cpu_wheel
    old_driver = gpu_verdict(RTX3060, "13.0", False)
    assert "supports CUDA up to 12.4" in old_driver and "built for CUDA 13.0" in old_driver
    assert "whl/cu126" not in old_driver and "update the NVIDIA driver" in old_driver  # 12.4 < every wheel
    newer = parse_nvidia_smi("CUDA Version: 12.8", "NVIDIA RTX 4090, 570.1, 8.9")
    assert "FPL_TORCH_INDEX=https://download.pytorch.org/whl/cu128" in gpu_verdict(newer, "13.0", False)
    # is_available() says yes for a build without kernels for the card: the arch list decides.
    blackwell = gpu_verdict(RTX5070, "12.6", True, ("sm_80", "sm_86", "sm_90"))
    assert gpu_verdict(RTX5070, "12.8", True, ("sm_90", "sm_100", "sm_120")) is None
    assert "no kernels for its generation (compute capability 12.0)" in blackwell and "cu128" in blackwell
    other = gpu_verdict(RTX3060, "12.4", False, ("sm_86",))
    assert "cannot use it" in other
    for sentence in (cpu_wheel, old_driver, blackwell, other):
        assert "\n" not in sentence and sentence.endswith(".")


def test_run_sh_picks_the_newest_build_the_driver_runs():
    from framepack_local.memory.gpu_check import torch_index_for

    assert torch_index_for(None) == ("", "no NVIDIA GPU answered nvidia-smi: the CPU build")
    assert torch_index_for(RTX5070)[0] == "https://download.pytorch.org/whl/cu130"  # driver 580, CUDA 13.0
    cuda_128 = parse_nvidia_smi("Driver Version: 570.86  CUDA Version: 12.8", "NVIDIA RTX 4070, 570.86, 8.9")
    assert torch_index_for(cuda_128)[0].endswith("/cu128")
    index, why = torch_index_for(RTX3060)  # CUDA 12.4: older than every build on the index
    assert index.endswith("/cu126") and "update the NVIDIA driver" in why


def test_the_script_runs_with_the_standard_library_only(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "framepack_local" / "memory" / "gpu_check.py"
    # -S -I: no site-packages, as run.sh calls it before the virtual environment exists
    done = subprocess.run([sys.executable, "-S", "-I", str(script), "--torch-index"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path, env={"PATH": str(tmp_path)})  # no nvidia-smi
    assert done.returncode == 0 and done.stdout == "\n" and "the CPU build" in done.stderr


def test_doctor_reports_this_machine_and_fails_on_an_unusable_gpu(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import json

    from framepack_local.__main__ import main
    from framepack_local.memory import gpu_check

    assert main(["doctor", "--json", "--models", str(tiny_model_dir), "--outputs", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    names = {c["name"]: c for c in report["checks"]}
    assert report["ok"] and {"Python", "PyTorch", "GPU usable", "RAM", "Attention", "Memory plan"} <= set(names)
    assert "CPU build" in names["PyTorch"]["value"] and "skipped" in names["Measured"]["value"]  # no GPU here
    assert "transformer" in names["Memory plan"]["value"]
    sentence = "An NVIDIA GPU (X) is here, but the installed PyTorch is the CPU build, so jobs would run on the CPU."
    monkeypatch.setattr(gpu_check, "check_gpu", lambda: sentence)
    assert main(["doctor", "--quick", "--models", str(tmp_path / "none"), "--outputs", str(tmp_path)]) == 1
    table = capsys.readouterr().out
    assert f"!! {sentence}" in table and "Fix the lines marked !! first." in table and "lacks" in table
