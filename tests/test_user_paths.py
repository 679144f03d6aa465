"""`qcli quantize` with no data, as a user runs it: one command, one output folder.

The folder is built beside the target and swapped in at the end, so: what it records
(summary.json, the .qcli manifest) names the final folder and never the temporary one; a run
interrupted late leaves a previous output byte for byte as it was; an existing output is
refused without --force (one line, exit 1 or 2) and replaced, not merged, with it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from click.testing import CliRunner

import qcli.stages.quantize as quantize_stage
from qcli.cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")

R20 = "builtin:resnet20_cifar10"
OUTPUTS = {"calib-data", "model.qcli", "model.onnx", "summary.json"}


def run(*args: Any) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def quantize_args(weights: Path, out: Path, bits: str, *extra: Any) -> list[Any]:
    """The data-free chain at its smallest: 4 generated images, 2 steps of everything."""
    tiny = ["--num-images", 4, "--gen-iters", 2, "--no-latency"]
    if bits != "w8a8":
        tiny += ["--iters", 2]  # w4a8 runs QDrop + BN tuning
    return ["quantize", R20, "--weights", weights, "--bits", bits, *tiny, "--out", out, *extra]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` by relative path: file bytes, None for folders."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def leftovers(parent: Path, out: Path) -> list[str]:
    """Temporary siblings (.NAME.tmp-PID, .NAME.old-PID) that a run left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, weights: Path) -> dict[str, Path]:
    outs = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread`, for this module-wide setup
    try:
        for key, bits, extra in (
            ("w8a8", "w8a8", ()),
            ("w4a8", "w4a8", ()),
            ("mixed", "w4a8", ("--mixed",)),
            ("uniform", "w4a8", ("--uniform",)),
        ):
            out = tmp_path_factory.mktemp(f"q-{key}") / "r20"
            code, _, err = run(*quantize_args(weights, out, bits, *extra))
            assert code == 0, err
            outs[key] = out
    finally:
        torch.set_num_threads(before)
    return outs


def test_below_8_bits_the_size_is_a_budget_and_uniform_keeps_every_layer_at_it(
    quantized: dict[str, Path],
):
    """`--bits w4a8 --mixed` allocates 2-8 bits per layer within the size of uniform 4-bit
    weights (and passes the export gate); `--uniform` puts every layer at 4 bits; without
    either, the allocation runs and is kept only where it predicts a large gain."""
    mixed = json.loads((quantized["mixed"] / "summary.json").read_text())
    assert mixed["bits"] == "mixed at the size of w4a8"
    plan = mixed["plan"]
    widths = {int(b) for per_kind in plan["weights"].values() for b in per_kind}
    assert len(widths) > 1 and widths <= {2, 3, 4, 8}
    assert plan["weight_bytes"] <= plan["budget_bytes"]
    assert plan["budget_bytes"] == sum(  # the 4-bit size: every weight at 4 bits
        u["params"] * 4 / 8
        for u in json.loads((quantized["mixed"] / "bits.json").read_text())["sensitivities"][
            "units"
        ]
        if u["kind"] == "weight"
    )
    assert mixed["export"]["check"]["exact"]["tensors_differ"] == 0
    uniform = json.loads((quantized["uniform"] / "summary.json").read_text())
    assert uniform["bits"] == "w4a8" and "budget_bytes" not in uniform["plan"]
    assert {int(b) for per_kind in uniform["plan"]["weights"].values() for b in per_kind} == {4}
    assert not (quantized["uniform"] / "bits.json").exists()
    assert uniform["plan"]["weight_bytes"] == plan["budget_bytes"]
    auto = json.loads((quantized["w4a8"] / "summary.json").read_text())["allocate_bits"]
    gain = auto["predicted_degradation"] / auto["uniform_predicted_degradation"]
    assert auto["chosen"] == ("mixed" if gain <= quantize_stage.MIXED_MIN_GAIN else "uniform")


def test_choose_plan_follows_the_flag_else_the_predicted_gain():
    choose = quantize_stage.choose_plan
    assert choose("uniform", 0.01, 1.0) == "uniform" and choose("mixed", 0.9, 1.0) == "mixed"
    assert choose(None, 0.1, 1.0) == "mixed"  # effl0 W4A8: a tenth of uniform's KL
    assert choose(None, 0.51, 1.0) == "uniform"  # r20 W4A4: half, and reconstruction wins


@pytest.fixture
def previous(tmp_path: Path, quantized: dict[str, Path]) -> Path:
    """A copy of a finished W8A8 output, to be replaced (or not) by a second run."""
    out = tmp_path / "r20"
    shutil.copytree(quantized["w8a8"], out)
    return out


@pytest.mark.parametrize("bits", ["w8a8", "w4a8"])
def test_summary_is_valid_and_names_the_final_folder(quantized: dict[str, Path], bits: str):
    out = quantized[bits]
    allocated = bits != "w8a8"  # below 8 bits the allocation runs: bits.json holds its plan
    assert {p.name for p in out.iterdir()} == OUTPUTS | ({"bits.json"} if allocated else set())
    assert leftovers(out.parent, out) == []
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "model.qcli" / "manifest.json").read_text())
    data_manifest = json.loads((out / "calib-data" / "manifest.json").read_text())

    mixed = allocated and summary["allocate_bits"]["chosen"] == "mixed"
    assert summary["bits"] == (f"mixed at the size of {bits}" if mixed else bits)
    assert summary["method"] == ("qdrop" if allocated else "mse")
    assert summary["export"]["check"]["ok"] is True
    assert summary["eval_quantized"]["n_images"] == summary["data_generation"]["images"] == 4
    assert manifest["bits"].startswith("mixed") == mixed and manifest["calibration"]["images"] == 4
    if bits == "w4a8":
        assert manifest["method"]["bn_tune"] is True  # on by default below 8 bits

    # the recorded paths are the final ones, and they exist
    assert Path(summary["out"]) == out
    assert Path(summary["data_generation"]["out"]) == out / "calib-data"
    assert Path(summary["calibrate"]["out"]) == out / "model.qcli"
    assert Path(summary["export"]["out"]) == out / "model.onnx"
    assert Path(manifest["calibration"]["data"]) == out / "calib-data"
    onnx_props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    recorded = [*strings(summary), *strings(manifest), *strings(data_manifest)]
    recorded += list(onnx_props.values())
    tmp_marker = f".{out.name}.tmp"
    assert not [s for s in recorded if tmp_marker in s]
    for s in recorded:
        if s.startswith(str(out)):
            assert Path(s).exists(), s


class _Stop(Exception):
    pass


def _fail_at_second_evaluate(monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]) -> None:
    """Let the float evaluation run, then fail in the quantized one: the last stage."""
    real = quantize_stage.evaluate
    calls = []

    def evaluate(cfg, ui):
        calls.append(cfg)
        if len(calls) == 2:
            raise exc()
        return real(cfg, ui)

    monkeypatch.setattr(quantize_stage, "evaluate", evaluate)


def _fail_writing_summary(monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]) -> None:
    """Fail after every stage, while the summary is written (just before the swap)."""

    def write_manifest(path, obj):
        raise exc()

    monkeypatch.setattr(quantize_stage, "write_manifest", write_manifest)


@pytest.mark.parametrize(
    ("inject", "exc", "code"),
    [
        (_fail_at_second_evaluate, KeyboardInterrupt, 130),
        (_fail_writing_summary, _Stop, 1),
    ],
    ids=["ctrl-c-in-eval", "error-writing-summary"],
)
def test_interrupted_run_leaves_previous_output_intact(
    monkeypatch: pytest.MonkeyPatch, weights: Path, previous: Path, inject, exc, code: int
):
    before = snapshot(previous)
    inject(monkeypatch, exc)
    got, _, err = run(*quantize_args(weights, previous, "w8a8", "--force", "--seed", 1))
    assert got == code, err
    assert "Traceback" not in err
    assert snapshot(previous) == before
    assert leftovers(previous.parent, previous) == []


def test_existing_output_is_refused_without_force(weights: Path, previous: Path):
    before = snapshot(previous)
    code, _, err = run(*quantize_args(weights, previous, "w8a8"))
    assert code in (1, 2)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one sentence, no progress bars: refused before any work
    assert "--force" in lines[0] and str(previous.name) in lines[0]
    assert snapshot(previous) == before


def test_force_replaces_the_output(weights: Path, previous: Path):
    (previous / "stale.txt").write_text("from an older run")
    old_tensors = (previous / "model.qcli" / "tensors.safetensors").read_bytes()
    code, _, err = run(*quantize_args(weights, previous, "w8a8", "--force", "--seed", 1))
    assert code == 0, err
    assert {p.name for p in previous.iterdir()} == OUTPUTS  # replaced, not merged
    summary = json.loads((previous / "summary.json").read_text())
    manifest = json.loads((previous / "model.qcli" / "manifest.json").read_text())
    assert Path(summary["out"]) == previous and manifest["calibration"]["seed"] == 1
    assert (previous / "model.qcli" / "tensors.safetensors").read_bytes() != old_tensors
    assert leftovers(previous.parent, previous) == []


def test_relative_out_records_no_temporary_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weights: Path
):
    """`--out name` relative to the working folder: the temporary sibling is relative too."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(*quantize_args(weights, Path("rel-out"), "w8a8"))
    assert code == 0, err
    out = tmp_path / "rel-out"
    summary = json.loads((out / "summary.json").read_text())
    manifest = json.loads((out / "model.qcli" / "manifest.json").read_text())
    recorded = [*strings(summary), *strings(manifest)]
    assert not [s for s in recorded if ".rel-out.tmp" in s]
    for key in ("data_generation", "calibrate", "export"):
        assert (tmp_path / summary[key]["out"]).resolve().parent == out.resolve()
    assert (tmp_path / manifest["calibration"]["data"]).resolve() == (out / "calib-data").resolve()
    assert leftovers(tmp_path, out) == []


def test_summary_compares_what_a_user_deploys(quantized: dict[str, Path]):
    """The float model as ONNX beside the INT8 file (sizes; latency in one run when measured),
    the export held to the bit, and, on generated images, an agreement figure that says what
    it means instead of an empty top-1."""
    from qcli.cli import _quantize_rows

    summary = json.loads((quantized["w8a8"] / "summary.json").read_text())
    dep = summary["deployment"]
    assert 3 * dep["int8_onnx_bytes"] < dep["fp32_onnx_bytes"]  # 8-bit weights: ~4x smaller
    assert "latency_ms" not in dep  # --no-latency
    exact = summary["export"]["check"]["exact"]
    assert exact["enforced"] and exact["tensors_differ"] == 0 and exact["images_differ"] == 0
    rows = dict(_quantize_rows(summary))
    assert "top-1 FP -> quantized" not in rows  # no labels: no "- -> -"
    assert "no labels" in rows["agreement with FP"]
    assert rows["sim vs onnxruntime"].startswith("exact (0 of ")
    assert rows["size ONNX FP32 -> INT8"].count("MB") == 2
