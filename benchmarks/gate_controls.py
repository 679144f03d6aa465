"""The export gate's negative controls, before and after the integer-exact comparison.

`python benchmarks/gate_controls.py` calibrates the pretrained ResNet-20 (MSE ranges on 256
cifar10/train images, W8A8 and W4A8, as tests/test_gate.py does), writes each exporter bug of
tests/test_gate.py into an ONNX file and runs both gates on the same 32 cifar10/test images:

- before: the tolerance gate (the logits of the fake-quant simulation against onnxruntime's
  reference arithmetic and its integer kernels, within 5% of the logit range or 8 logit
  steps, no top-1 flip with a clear margin);
- after: `qcli export`'s gate (`compare_with_simulation`): the integer kernels bit for bit
  against the integer-exact simulation at the logits and every activation quantizer.

Writes benchmarks/results/gate_controls.json and benchmarks/gate_controls.md.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from suites.common import md_table, run_meta, shared_data, write_outputs  # noqa: E402

from qcli.data import iterate, open_data  # noqa: E402
from qcli.evaluate import OrtModel  # noqa: E402
from qcli.export.onnx_qdq import to_onnx  # noqa: E402
from qcli.stages import export as gate  # noqa: E402
from qcli.stages.common import load_qmodel  # noqa: E402
from test_gate import BUGS, R20, run  # noqa: E402


@torch.no_grad()
def _tolerance_gate(qm, path: Path, x: torch.Tensor) -> dict:
    sim = qm.graph.module.eval()(x)
    tol = gate.MAX_RELATIVE_ERROR_A8 if qm.graph.min_act_bits() >= 8 else gate.MAX_RELATIVE_ERROR
    step = gate.logit_step(qm.graph)
    reports = [
        gate.agreement_report(sim, OrtModel(path, optimize=opt)(x), tol, step)
        for opt in (False, True)
    ]
    worst = max(r["max_abs_diff"] / r["logit_range"] for r in reports)
    return {"ok": all(r["ok"] for r in reports), "relative_diff": worst}


def main() -> None:
    torch.set_num_threads(1)
    data = shared_data()
    weights = data.parent / "models" / "resnet20_cifar10.th"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in ("w8a8", "w4a8"):
            q = Path(tmp) / f"r20-{bits}.qcli"
            flags = ["--limit", 256, "--bits", bits, "--method", "mse", "--out", q]
            code, _, err = run(
                "calibrate", R20, "--weights", weights, "--data", data / "cifar10" / "train", *flags
            )
            assert code == 0, err
            qm = load_qmodel(q)
            ds = open_data(data / "cifar10" / "test", qm.input_spec, limit=32, seed=0)
            x = torch.cat([b for b, _ in iterate(ds, 32)])
            for bug in [None, *BUGS]:
                qg = qm.graph
                if bug is not None and bug.graph is not None:
                    qg = copy.deepcopy(qg)
                    with torch.no_grad():
                        bug.graph(qg)
                model = to_onnx(qg)
                if bug is not None and bug.onnx is not None:
                    bug.onnx(model)
                path = Path(tmp) / "m.onnx"
                onnx.save(model, str(path))
                before = _tolerance_gate(qm, path, x)
                check = gate.compare_with_simulation(qm, path, x)
                e = check["exact"]
                after_ok = check["ok"] and not (e["enforced"] and e["tensors_differ"])
                rows.append(
                    {
                        "bug": "honest export" if bug is None else bug.name,
                        "bits": bits,
                        "relative_diff": before["relative_diff"],
                        "before_ok": before["ok"],
                        "tensors_differ": e["tensors_differ"],
                        "tensors": e["tensors"],
                        "images_differ": e["images_differ"],
                        "first": e["first_differing"],
                        "after_ok": after_ok,
                    }
                )
                print(rows[-1], flush=True)
    meta = run_meta("gate_controls.py")

    def verdict(ok: bool, honest: bool) -> str:
        if honest:
            return "passes" if ok else "**refused**"
        return "**caught**" if not ok else "exported"

    table = [
        [
            r["bug"],
            r["bits"],
            f"{100 * r['relative_diff']:.2f}%",
            verdict(r["before_ok"], r["bug"] == "honest export"),
            f"{r['tensors_differ']} of {r['tensors']}",
            verdict(r["after_ok"], r["bug"] == "honest export"),
        ]
        for r in rows
    ]
    header = [
        "exporter bug",
        "bits",
        "max |Δlogit| / range",
        "tolerance gate (before)",
        "tensors not bit-identical",
        "exact gate (after)",
    ]
    md = "\n".join(
        [
            "# Export gate: negative controls before and after the integer-exact comparison",
            "",
            f"- command: `{meta['command']}` at commit `{meta['commit']}`, {meta['date']}",
            f"- CPU flags: {meta['cpu_flags']}; load {meta['load']}; onnxruntime "
            f"{meta['onnxruntime']}",
            "- ResNet-20 (pretrained), MSE ranges on 256 cifar10/train images; 32 cifar10/test "
            "check images. The bugs are those of tests/test_gate.py.",
            "",
            md_table(header, table),
        ]
    )
    write_outputs("gate_controls", {**meta, "rows": rows}, md)


if __name__ == "__main__":
    main()
