"""benchmarks/profiles/ort_node_profile.py on a real exported segment: every convolution's MACs are
found, and the printed shares are of the kernels' total (no timing assertions)."""

import re
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "profiles"))

import ort_node_profile  # noqa: E402


def test_conv_macs_and_the_printed_table(tiny_repository, capsys):
    segment = next(tiny_repository.glob("*_seg0to*/1/model.onnx"))
    model = onnx.load(segment)
    macs = ort_node_profile.conv_macs(model, batch=2)
    assert len(macs) == sum(node.op_type == "Conv" for node in model.graph.node)
    assert all(value > 0 and value % 2 == 0 for value in macs.values())  # batch 2: every count doubles
    assert ort_node_profile.main([str(segment), "--batch", "2", "--runs", "3", "--top", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{segment}, batch 2, 3 runs")
    shares = [float(m.group(1)) for m in (re.search(r" ([0-9.]+)%", line) for line in lines[1:]) if m]
    assert shares and abs(sum(shares) - 100) < 1.0
    assert any("GMAC/s" in line and " Conv " in line for line in lines[1:])


def test_int8_copy_is_profiled_after_the_float_line(tiny_repository, capsys):
    segment = next(tiny_repository.glob("*_seg0to*/1/model.onnx"))
    assert ort_node_profile.main([str(segment), "--batch", "2", "--runs", "3", "--int8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{segment} (float), batch 2, 3 runs: model_run median")
    assert lines[1].startswith(f"{segment} (int8), batch 2")
    assert any("QLinearConv" in line or "QuantizeLinear" in line for line in lines[2:])


def test_front_candidates_exports_and_profiles_each_segment(imagefolder, tmp_path, capsys):
    import front_candidates

    assert front_candidates.main(["--candidate", "mwresnet8_3:4", "--data", str(imagefolder), "--batch", "2",
                                  "--repeats", "2", "--output", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"mwresnet8_3_w4 exit {d}" for d in (3, 5, 8)]
    assert all(re.search(r"segment [0-9.]+ MMAC .* at batch 2, [0-9.]+ us/MMAC$", line) for line in lines)
    assert (tmp_path / "mwresnet8_3_w4.safetensors").exists()
