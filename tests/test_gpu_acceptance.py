"""benchmarks/gpu_acceptance.py --dry-run: the GPU acceptance script runs end to end on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_writes_the_result(tiny_model_dir, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_acceptance.py"), "--dry-run",
                           "--work", str(tmp_path / "work"), "--models", str(tiny_model_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["ok"] is True
    assert result["selftest"]["passed"] and set(result["selftest"]["storages"]) == {"bf16", "fp8", "disk"}
    cards = result["transformer"]
    assert [r["card_gb"] for r in cards] == [6, 8, 12, 24]
    for row in cards:
        assert row["equal"] is True and row["max_abs_diff"] == 0.0
        assert row["streamed_blocks"] >= 1 and row["s_per_step"] > 0 and row["predicted_vram"] > 0
        assert row["copies"] == "overlapped"  # the self-test passed
    assert result["vae"]["frames"] > 0 and "error" not in result["vae"]
    modes = {r["mode"]: r for r in result["text_encoder"]}
    assert modes["int8"]["skipped"] and modes["int4"]["skipped"]  # bitsandbytes needs CUDA
    assert modes["disk-fp16"]["finite"] and modes["disk-fp16"]["s_per_prompt"] > 0
    assert "verdict: PASS" in done.stdout and "card" in done.stdout
