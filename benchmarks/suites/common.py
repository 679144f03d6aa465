"""What every suite shares: the run context, models and data, caching, evaluation, tables.

Models and data follow /shared/BENCHMARKS.md: r20 calibrates on the first 1,024 images of a
fixed shuffle of cifar10/train and is evaluated on cifar10/test; effl0 calibrates on 100 fixed
images of imagenet-sample and is evaluated on the other 400.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcli.data import ImageFolderSet, TensorSet, iterate, open_data
from qcli.evaluate import OrtModel, accuracy
from qcli.export import kernels
from qcli.export.float_onnx import export_module
from qcli.quant.capture import capture, set_float
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig
from qcli.stages.calibrate import CalibrateConfig, calibrate
from qcli.stages.common import DataOptions, ModelOptions, load_qmodel
from qcli.stages.export import ExportConfig, export
from qcli.ui import SilentUI
from suites.rss import peak_rss_mb, reset_peak_rss

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"
CACHE = BENCH / ".cache"
THREADS = 2  # onnxruntime intra-op threads for every timing and evaluation
# torch intra-op threads for calibration and the PyTorch evaluations. On this shared 2-core
# machine two threads made the simulation 6-25x slower than one (threads waiting for each
# other at every small op); peers in BENCHMARKS.md were also timed with one thread.
TORCH_THREADS = 1
EFFL0_CALIB = 100
SPLIT_SEED = 0


def log(msg: str) -> None:
    la = os.getloadavg()
    print(f"[{time.strftime('%H:%M:%S')} load {la[0]:.1f}] {msg}", flush=True)


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- environment --------------------------------------------------------------------------


def shared_data() -> Path:
    return Path(os.environ.get("QCLI_SHARED_DATA", REPO.parent / "shared" / "data"))


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.rstrip("\n")  # not strip(): porcelain lines start with a space


def src_hash() -> str:
    """Hash of every file under src/: cached artifacts are keyed by the code that made them."""
    h = hashlib.sha256()
    for p in sorted((REPO / "src").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def environment() -> dict[str, Any]:
    import onnxruntime

    return {
        "git_commit": _git("rev-parse", "HEAD").strip(),
        "git_dirty_files": [line[3:] for line in _git("status", "--porcelain").splitlines()],
        "src_hash": src_hash(),
        "cores": os.cpu_count(),
        "ort_threads": THREADS,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "cpu_kernel_class": kernels.cpu_kernel_class(),
        "cpu_flags": cpu_flags(),
    }


def cpu_flags() -> list[str]:
    """The integer-kernel flags the brief asks every measurement to name."""
    wanted = {"avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    return sorted({w for w in text.split() if w in wanted})


@dataclass
class Context:
    """One invocation of run.py: options, environment, cache root."""

    quick: bool
    use_cache: bool
    command: str
    data: Path
    env: dict[str, Any] = field(default_factory=dict)
    models: tuple[str, ...] | None = None  # run only these benchmark models
    epochs: int | None = None  # qat: epochs per row (None: the suite's default)
    seeds: tuple[int, ...] | None = None  # qat: seeds of the multi-seed rows
    interval: int | None = None  # qat: epochs between coreset selections (None: E // 5)
    rows: str | None = None  # ptq: regex over row labels (gap rows: "gap: <label>")
    bits: tuple[str, ...] | None = None  # ptq: only these bit widths
    tag: str | None = None  # results go to <suite>.<tag>.json/.md, beside the full table

    def wants(self, label: str) -> bool:
        """Whether a row runs under `--rows` (every row without it)."""
        return self.rows is None or re.search(self.rows, label, re.IGNORECASE) is not None

    def wants_bits(self, bits: str) -> bool:
        """Whether a bit width runs under `--bits` (every one without it)."""
        return self.bits is None or bits in self.bits

    @property
    def cache(self) -> Path:
        return CACHE / self.env["src_hash"]

    def key_dir(self, *parts: str) -> Path:
        return self.cache.joinpath(*parts)


def prune_cache(keep: Path) -> None:
    """Keep the current code's cache and the two most recent others (besides data/)."""
    if not CACHE.is_dir():
        return
    dirs = sorted(
        (p for p in CACHE.iterdir() if p.is_dir() and p.name != "data" and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in dirs[2:]:
        shutil.rmtree(old, ignore_errors=True)


# -- models and data ----------------------------------------------------------------------


@dataclass
class Bench:
    """A benchmark model: how to load it, where its calibration and evaluation images are."""

    key: str
    model: ModelOptions
    calib: DataOptions
    eval_path: Path
    eval_limit: int | None
    eval_batch: int
    calib_desc: str
    eval_desc: str
    _loaded: Any = None
    _eval: TensorSet | None = None

    def loaded(self):
        if self._loaded is None:
            self._loaded = self.model.load()
        return self._loaded

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, *self.loaded().input_spec.size)

    def eval_set(self) -> TensorSet:
        """Evaluation images decoded once and kept in memory (every target sees the same)."""
        if self._eval is None:
            t = time.perf_counter()
            ds = open_data(self.eval_path, self.loaded().input_spec, limit=self.eval_limit)
            xs, ys = zip(*iterate(ds, 256), strict=True)
            skipped = getattr(ds, "skipped", [])
            if skipped:
                log(f"{self.key}: {len(skipped)} unreadable evaluation images skipped")
            self._eval = TensorSet(torch.cat(xs), torch.cat(ys))
            log(
                f"{self.key}: {len(self._eval)} evaluation images decoded in "
                f"{time.perf_counter() - t:.1f} s"
            )
        return self._eval

    def eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate(self.eval_set(), self.eval_batch)

    def calib_arrays(self, batch_size: int) -> list[np.ndarray]:
        """The calibration images qcli uses, as float32 NCHW batches (for onnxruntime)."""
        ds = open_data(
            self.calib.path, self.loaded().input_spec, limit=self.calib.limit, seed=SPLIT_SEED
        )
        return [x.numpy() for x, _ in iterate(ds, batch_size)]


def benches(ctx: Context, keys: list[str]) -> list[Bench]:
    out = []
    for key in keys:
        if ctx.models is not None and key not in ctx.models:
            continue
        if key == "r20":
            out.append(
                Bench(
                    key="r20",
                    model=ModelOptions(
                        "builtin:resnet20_cifar10",
                        weights=str(ctx.data.parent / "models" / "resnet20_cifar10.th"),
                    ),
                    calib=DataOptions(ctx.data / "cifar10" / "train", limit=1024, batch_size=32),
                    eval_path=ctx.data / "cifar10" / "test",
                    eval_limit=2000 if ctx.quick else None,
                    eval_batch=100,
                    calib_desc="cifar10/train, 1,024 images (seeded subset, seed 0)",
                    eval_desc="cifar10/test, "
                    + ("2,000 images (seeded subset, seed 0)" if ctx.quick else "all 10,000"),
                )
            )
        elif key == "effl0":
            calib_dir, eval_dir = split_imagenet_sample(ctx.data / "imagenet-sample")
            out.append(
                Bench(
                    key="effl0",
                    model=ModelOptions("builtin:efficientnet_lite0"),
                    calib=DataOptions(calib_dir, batch_size=32),
                    eval_path=eval_dir,
                    eval_limit=None,
                    eval_batch=8,
                    calib_desc=f"imagenet-sample, {EFFL0_CALIB} fixed images (seed {SPLIT_SEED})",
                    eval_desc=f"imagenet-sample, the other {500 - EFFL0_CALIB} images",
                )
            )
        else:
            raise ValueError(key)
    return out


def split_imagenet_sample(root: Path) -> tuple[Path, Path]:
    """Two symlink folders (<wnid>/<file> plus wnids.txt): 100 calibration images, the rest
    for evaluation, chosen by a seeded permutation of the sorted file list."""
    from qcli.models import IMAGENET_SPEC

    samples = ImageFolderSet(root, IMAGENET_SPEC).samples  # sorted (path, label)
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(SPLIT_SEED))
    chosen = {
        "calib": sorted(perm[:EFFL0_CALIB].tolist()),
        "eval": sorted(perm[EFFL0_CALIB:].tolist()),
    }
    tag = hashlib.sha256(
        "\n".join(str(p.relative_to(root)) for p, _ in samples).encode()
    ).hexdigest()[:12]
    dirs = []
    for part, idx in chosen.items():
        d = CACHE / "data" / f"imagenet-sample-{tag}-s{SPLIT_SEED}-{part}"
        if not (d / ".done").exists():
            # built beside and renamed into place: two benchmark processes started together
            # each build their own, and the loser's is dropped (a shared one got half-deleted)
            shutil.rmtree(d, ignore_errors=True)
            d.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=d.name + ".", dir=d.parent))
            shutil.copy(root / "wnids.txt", tmp / "wnids.txt")
            for i in idx:
                p = samples[i][0]
                (tmp / p.parent.name).mkdir(exist_ok=True)
                (tmp / p.parent.name / p.name).symlink_to(p.resolve())
            (tmp / "files.txt").write_text(
                "\n".join(str(samples[i][0].relative_to(root)) for i in idx) + "\n"
            )
            (tmp / ".done").touch()
            try:
                tmp.rename(d)
            except OSError:  # another process renamed its copy first
                shutil.rmtree(tmp, ignore_errors=True)
        dirs.append(d)
    return dirs[0], dirs[1]


# -- quantize, export, evaluate -----------------------------------------------------------


def cache_key(**settings: Any) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Artifact:
    qmodel: Path
    onnx: Path | None
    info: dict[str, Any]  # calibration seconds, load average, export check, errors


def qcli_artifact(
    ctx: Context, b: Bench, method: str, bits: str, settings: dict[str, Any] | None = None
) -> Artifact:
    """Calibrate and export one (model, method, bits, settings); cached by code and settings."""
    settings = dict(settings or {})
    key = cache_key(
        model=b.key, spec=b.model.spec, calib=str(b.calib), method=method, bits=bits, **settings
    )
    d = ctx.key_dir(b.key, f"{method}-{bits}-{key}")
    info_file = d / "info.json"
    if ctx.use_cache and info_file.is_file():
        info = json.loads(info_file.read_text())
        info["cached"] = True
        onnx_path = d / "model.onnx"
        return Artifact(d / "model.qcli", onnx_path if onnx_path.is_file() else None, info)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    info: dict[str, Any] = {"method": method, "bits": bits, "settings": settings}
    tuning = {k: bool(settings.pop(k, False)) for k in ("bn_tune", "bias_tune")}
    int8_range = settings.pop("int8_range", "safe")
    cfg = CalibrateConfig(
        model=b.model,
        data=b.calib,
        out=d / "model.qcli",
        bits=BitConfig.parse(bits),
        method=method,
        force=True,
        settings=settings,
        int8_range=int8_range,
        **tuning,
    )
    la0 = loadavg()
    reset_peak_rss()
    t = time.perf_counter()
    res = calibrate(cfg, SilentUI())
    info["calibrate_wall_s"] = round(time.perf_counter() - t, 2)
    peak = peak_rss_mb()
    info["calibrate_peak_rss_mb"] = None if peak is None else round(peak, 1)
    info["calibrate_s"] = res.get("seconds")
    info["calibrate_loadavg"] = [la0, loadavg()]
    info["calibrate_result"] = res
    onnx_path: Path | None = d / "model.onnx"
    t = time.perf_counter()
    try:
        ex = export(ExportConfig(qmodel=d / "model.qcli", out=onnx_path, force=True), SilentUI())
        info["export"] = ex
    except Exception as e:  # a failed export is a result to report, not a crash
        info["export_error"] = f"{type(e).__name__}: {e}"
        onnx_path = None
    info["export_s"] = round(time.perf_counter() - t, 2)
    info_file.write_text(json.dumps(info, indent=2, default=str))
    info["cached"] = False
    return Artifact(d / "model.qcli", onnx_path, info)


def sim_fn(qmodel: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    module = load_qmodel(qmodel).graph.module.eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return fn


def torch_fn(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    module = module.eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return fn


@dataclass
class Scored:
    top1: float
    n: int
    predictions: torch.Tensor
    seconds: float
    loadavg: list[float]
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "n": self.n,
            "eval_s": self.seconds,
            "loadavg": self.loadavg,
            "cached": self.cached,
        }


def score(
    b: Bench,
    make_fn: Callable[[], Callable[[torch.Tensor], Any]],
    cache_file: Path | None = None,
    use_cache: bool = True,
) -> Scored:
    """Top-1 and per-image predictions of `make_fn()` on the evaluation images.

    With `cache_file` (a path under the code-keyed cache) the predictions are stored, and a
    later suite run on the same code, model and images reads them instead of recomputing.
    """
    if cache_file is not None and use_cache and cache_file.is_file():
        d = torch.load(cache_file, weights_only=True)
        if d["eval"] == b.eval_desc:
            return Scored(d["top1"], d["n"], d["predictions"], d["seconds"], d["loadavg"], True)
    t = time.perf_counter()
    acc = accuracy(make_fn(), b.eval_batches())
    s = Scored(acc.top1, acc.n, acc.predictions, round(time.perf_counter() - t, 2), loadavg())
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        d = {"eval": b.eval_desc, "top1": s.top1, "n": s.n, "seconds": s.seconds}
        torch.save({**d, "predictions": s.predictions, "loadavg": s.loadavg}, cache_file)
    return s


def eval_tag(b: Bench) -> str:
    return "eval-" + cache_key(path=str(b.eval_path), limit=b.eval_limit)


def score_fp(ctx: Context, b: Bench) -> Scored:
    """The float PyTorch model (cached per code version, model and evaluation images)."""
    f = ctx.key_dir(b.key, f"fp-torch-{eval_tag(b)}.pt")
    return score(b, lambda: torch_fn(b.loaded().module), f, ctx.use_cache)


def score_sim(ctx: Context, b: Bench, qmodel: Path) -> Scored:
    """The PyTorch simulation of a .qcli folder (predictions cached beside it)."""
    f = qmodel.parent / f"sim-{eval_tag(b)}.pt"
    return score(b, lambda: sim_fn(qmodel), f, ctx.use_cache)


def score_ort(ctx: Context, b: Bench, onnx_path: Path, optimize: bool = True) -> Scored:
    """An ONNX file in onnxruntime (predictions cached beside it); `optimize=False` runs its
    reference arithmetic (graph optimizations off) instead of the integer kernels."""
    import onnxruntime

    tag = "" if optimize else "-reference"
    f = onnx_path.parent / f"{onnx_path.stem}-ort{onnxruntime.__version__}{tag}-{eval_tag(b)}.pt"
    return score(
        b, lambda: OrtModel(onnx_path, threads=THREADS, optimize=optimize), f, ctx.use_cache
    )


def differ_pct(a: Scored, b: Scored) -> float:
    return 100.0 * float((a.predictions != b.predictions).float().mean())


def export_fp32_onnx(ctx: Context, b: Bench) -> tuple[Path, str]:
    """The float model as ONNX (TorchScript exporter, opset 17, dynamic batch).

    A model with timm's Conv2dSame (padding computed from the input shape at run time: Shape,
    Ceil, Pad ... subgraphs in ONNX) is exported from qcli's captured graph with every
    quantizer off instead: the same arithmetic with static pads for the model's input size,
    which is what qcli's export and peers (BENCHMARKS.md) deploy.
    Returns (path, how it was made).
    """
    loaded = b.loaded()
    dynamic = any(type(m).__name__ == "Conv2dSame" for m in loaded.module.modules())
    how = "capture()'d graph, quantizers off (static pads)" if dynamic else "float model"
    key = cache_key(spec=b.model.spec, torch=torch.__version__, how=how)
    d = ctx.key_dir(b.key, "fp32-" + key)
    path = d / "model.onnx"
    if ctx.use_cache and path.is_file():
        return path, how
    d.mkdir(parents=True, exist_ok=True)
    module = loaded.module.eval()
    if dynamic:
        qg = capture(loaded.module, b.input_shape, QuantPlan.uniform(BitConfig(8, 8)))
        set_float(qg)
        module = qg.module.eval()
    tmp = d / "model.onnx.tmp"
    export_module(module, b.input_shape, tmp)
    tmp.replace(path)
    return path, how


# -- output -------------------------------------------------------------------------------


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def drop(top1: float | None, ref: float) -> str:
    if top1 is None:
        return "—"
    d = top1 - ref
    return f"{d:+.2f}".replace("-", "−")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(suite: str, payload: dict[str, Any] | None, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    if payload is not None:
        _replace(RESULTS / f"{suite}.json", json.dumps(payload, indent=2) + "\n")
        log(f"wrote benchmarks/results/{suite}.json")
    _replace(BENCH / f"{suite}.md", markdown.rstrip() + "\n")
    log(f"wrote benchmarks/{suite}.md")


def _replace(path: Path, text: str) -> None:
    """Write beside, then rename: an interrupted run leaves the previous table intact."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_meta(script: str) -> dict[str, Any]:
    """Provenance of a standalone benchmark script's run, for its JSON and its table."""
    env = environment()
    return {
        **env,
        "command": f"python benchmarks/{script} " + " ".join(os.sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_flags": " ".join(env["cpu_flags"]),
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "commit": env["git_commit"][:7],
    }


def write_partial(ctx: Context, body: dict[str, Any]) -> None:
    """Cells so far, so a run cut short still leaves its numbers (never read back)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "-".join(ctx.models) if ctx.models else "all"
    tag += f"-{ctx.tag}" if ctx.tag else ""
    (RESULTS / f"partial-{tag}.json").write_text(json.dumps(body, indent=1, default=str))


def header_lines(payload: dict[str, Any]) -> list[str]:
    """The run's provenance, from the suite's JSON payload."""
    env = payload
    dirty = [f for f in env["git_dirty_files"] if f.startswith("src/")]
    if payload.get("runs"):  # merged from per-model runs made side by side
        runs = "; ".join(
            f"`{r['command']}` ({r['date']}, {r['wall_s']:.0f} s, load {r['loadavg_start'][0]}"
            f"→{r['loadavg_end'][0]})"
            for r in payload["runs"]
        )
        return [
            f"- merged (`run.py --suite ptq --merge`) from runs made side by side: {runs}",
            f"- git commit at the first: `{env['git_commit'][:12]}`",
            f"- machine: {env['cores']} cores, onnxruntime {env['onnxruntime']} with "
            f"{env['ort_threads']} intra-op threads, torch {env['torch']} with "
            f"{env['torch_threads']} thread(s) per run, OMP_WAIT_POLICY={env['omp_wait_policy']}",
        ]
    return [
        f"- command: `{env['command']}`" + (" (quick mode)" if env["quick"] else ""),
        f"- date: {payload['date']}; wall time {payload['wall_s']:.0f} s",
        f"- git commit: `{env['git_commit'][:12]}`"
        + (f" with {len(dirty)} uncommitted file(s) under src/" if dirty else " (src/ clean)")
        + f"; src hash `{env['src_hash']}`"
        + (
            f" (src/ changed during the run: `{payload['src_hash_end']}` at the end)"
            if payload.get("src_hash_end", env["src_hash"]) != env["src_hash"]
            else ""
        ),
        f"- machine: {env['cores']} cores, onnxruntime {env['onnxruntime']} with "
        f"{env['ort_threads']} intra-op threads, torch {env['torch']} with {env['torch_threads']} "
        f"thread(s) for calibration and simulation, OMP_WAIT_POLICY="
        f"{env['omp_wait_policy']}"
        + (
            f"; CPU flags {' '.join(env['cpu_flags'])} (integer kernels: {env['cpu_kernel_class']})"
            if "cpu_flags" in env
            else ""
        ),
        f"- load average (1/5/15 min) at start {payload['loadavg_start']}, "
        f"at end {payload['loadavg_end']}",
    ]
