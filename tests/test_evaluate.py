"""evaluate: accuracy and agreement on known answers, onnxruntime parity, latency, size."""

from __future__ import annotations

import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qcli.errors import QcliError, UsageError
from qcli.evaluate import Accuracy, OrtModel, accuracy, file_size, latency


def _identity_batches(logits: list[list[float]], labels: list[int], batch_size: int):
    """Batches whose images *are* the logits, so `nn.Flatten()` is a model with known output."""
    x = torch.tensor(logits).reshape(len(logits), 1, 1, -1)
    y = torch.tensor(labels)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


# Six classes; each row's classes ranked by score: the label's rank decides top-1/top-5.
LOGITS = [
    [9, 1, 2, 3, 4, 5],  # rank 1 of label 0            -> top1, top5
    [1, 9, 2, 3, 4, 5],  # label 0 is rank 6            -> miss both
    [0, 1, 2, 3, 4, 9],  # label 1 is rank 5            -> top5 only
    [5, 4, 3, 2, 1, 0],  # unlabeled (-1)
    [0, 0, 9, 0, 0, 0],  # label 2 is rank 1            -> top1, top5
]
LABELS = [0, 0, 1, -1, 2]


def test_accuracy_known_values_and_unlabeled_images():
    progress: list[int] = []
    acc = accuracy(nn.Flatten(), _identity_batches(LOGITS, LABELS, 2), progress=progress.append)
    assert isinstance(acc, Accuracy)
    assert acc.n == 4 and acc.n_images == 5
    assert acc.top1 == pytest.approx(50.0)
    assert acc.top5 == pytest.approx(75.0)
    assert acc.predictions.tolist() == [0, 1, 5, 0, 2]
    assert acc.agreement_with_reference is None and acc.disagreements is None
    assert progress == [2, 2, 1]  # batch sizes: the UI advances by each
    assert set(acc.to_dict()) >= {"top1", "top5", "n", "agreement_with_reference"}
    assert "predictions" not in acc.to_dict()


def test_agreement_counts_every_image_including_unlabeled():
    def reference(x: torch.Tensor) -> torch.Tensor:
        logits = x.flatten(1).clone()
        logits[:, 3] += 100 * (logits[:, 0] == 5)  # flips only the unlabeled row to class 3
        logits[:, 4] += 100 * (logits[:, 2] == 9)  # flips the last row to class 4
        return logits

    acc = accuracy(nn.Flatten(), _identity_batches(LOGITS, LABELS, 3), reference_fn=reference)
    assert acc.disagreements == 2
    assert acc.agreement_with_reference == pytest.approx(60.0)
    assert acc.reference_predictions is not None
    assert acc.reference_predictions.tolist() == [0, 1, 5, 3, 4]


def test_top5_with_fewer_than_five_classes_and_numpy_outputs():
    logits = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]
    batches = _identity_batches(logits, [0, 1], 2)
    acc = accuracy(lambda x: x.flatten(1).numpy(), batches)
    assert acc.top1 == 0.0
    assert acc.top5 == 100.0


def test_all_unlabeled_gives_no_accuracy_but_agreement():
    batches = _identity_batches(LOGITS, [-1] * 5, 5)
    acc = accuracy(nn.Flatten(), batches, reference_fn=nn.Flatten())
    assert acc.top1 is None and acc.top5 is None and acc.n == 0
    assert acc.agreement_with_reference == 100.0 and acc.disagreements == 0


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _export(model: nn.Module, path: Path, dynamic: bool = True, batch: int = 1) -> Path:
    """TorchScript-based export: still present (deprecated) in torch 2.14 and dependency-free."""
    kwargs = {"dynamic_axes": {"input": {0: "n"}, "logits": {0: "n"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(batch, 3, 16, 16),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            **kwargs,
        )
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = TinyNet().eval()
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.mark.parametrize("batch", [1, 7])
def test_ort_model_matches_torch_with_dynamic_batch(tiny, batch):
    model, path = tiny
    ort_model = OrtModel(path, threads=1)
    assert ort_model.input_name == "input" and ort_model.fixed_batch is None
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(ort_model(x), expected, atol=1e-5, rtol=1e-5)


def test_ort_model_runs_fixed_batch_model_on_any_batch(tmp_path):
    torch.manual_seed(1)
    model = TinyNet().eval()
    ort_model = OrtModel(_export(model, tmp_path / "fixed.onnx", dynamic=False, batch=2))
    assert ort_model.fixed_batch == 2
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ort_model(x), model(x), atol=1e-5, rtol=1e-5)


def test_ort_and_torch_agree_through_accuracy(tiny):
    model, path = tiny
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 16, 16, generator=gen), torch.tensor([0, 1, -1, 3]))]
    acc = accuracy(OrtModel(path), batches, reference_fn=model)
    assert acc.disagreements == 0 and acc.n == 3


def test_ort_model_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(QcliError, match=re.escape(str(missing))):
        OrtModel(missing)


@pytest.mark.parametrize("content", [b"this is not a protobuf \x00\xff" * 10, b""])
def test_ort_model_garbage_file_names_it(tmp_path, content):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(content)
    with pytest.raises(QcliError, match=re.escape(str(bad))) as info:
        OrtModel(bad)
    assert "not a valid ONNX model" in str(info.value)


def test_ort_model_directory_is_an_error(tmp_path):
    with pytest.raises(QcliError, match="not a file"):
        OrtModel(tmp_path)


def test_latency_returns_positive_medians_per_batch_size(tiny):
    model, path = tiny
    for fn in (model, OrtModel(path, threads=1)):
        stats = latency(fn, (3, 16, 16), batch_sizes=(1, 4), repeats=5, warmup=1)
        assert sorted(stats) == [1, 4]
        for n, s in stats.items():
            assert s.batch_size == n and s.repeats == 5
            assert 0 < s.min <= s.median <= s.p90
            assert s.mean > 0 and s.per_image == pytest.approx(s.median / n)
            assert s.to_dict()["median"] == s.median


def test_latency_budget_stops_early_but_keeps_three_repeats():
    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return x

    start = time.perf_counter()
    stats = latency(slow, (1, 2, 2), batch_sizes=(2,), repeats=1000, warmup=0, budget_s=0.01)
    assert stats[2].repeats == 3
    assert time.perf_counter() - start < 1.0


def test_file_size_of_file_and_folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 5)
    assert file_size(tmp_path / "a.bin") == 10
    assert file_size(tmp_path) == 15
    with pytest.raises(QcliError, match="missing"):
        file_size(tmp_path / "missing")


# onnxruntime's quantize_static as a peer baseline (benchmark code: benchmarks/suites)


def _ort_baseline():
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from suites import ort_baseline

    return ort_baseline


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_ort_quantize_static_runs_close_to_fp32(tiny, tmp_path, method):
    ort_quantize_static = _ort_baseline().ort_quantize_static

    _, path = tiny
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((8, 3, 16, 16), dtype=np.float32) for _ in range(4)]
    out = ort_quantize_static(path, tmp_path / f"q_{method}.onnx", calib, method=method)
    assert out.is_file()
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    x = torch.from_numpy(rng.standard_normal((16, 3, 16, 16), dtype=np.float32))
    fp32, int8 = OrtModel(path)(x).numpy(), OrtModel(out)(x).numpy()
    assert _cosine(fp32, int8) > 0.99


def test_ort_quantize_static_rejects_unknown_method(tiny, tmp_path):
    ort_quantize_static = _ort_baseline().ort_quantize_static

    with pytest.raises(UsageError, match="kl"):
        ort_quantize_static(tiny[1], tmp_path / "q.onnx", [np.zeros((1, 3, 16, 16))], method="kl")


def test_foreign_onnx_file_is_read_at_its_graph_input_size(tiny):
    """A file made outside qcli has no input spec: the graph's fixed H x W is used."""
    from qcli.stages.common import ModelOptions
    from qcli.stages.evaluate import _onnx_input_spec

    assert _onnx_input_spec(tiny[1], ModelOptions()).size == (16, 16)
    flags = ModelOptions(input_overrides={"size": 32})
    assert _onnx_input_spec(tiny[1], flags).size == (32, 32)  # a flag still wins


def test_static_check_flags_onnxruntime_quantize_static_files(tiny, tmp_path):
    """Peers' full-range int8 files can saturate on CPUs without VNNI: eval's static check
    finds that on any CPU."""
    ort_quantize_static = _ort_baseline().ort_quantize_static
    from qcli.export.kernels import pair_sum_violations

    calib = [np.random.default_rng(0).standard_normal((8, 3, 16, 16), dtype=np.float32)]
    out = ort_quantize_static(tiny[1], tmp_path / "q.onnx", calib, method="minmax")
    assert len(pair_sum_violations(out)) >= 2  # both regular convs (and the linear)
    assert pair_sum_violations(tiny[1]) == []  # a float file has no integer layers
