"""Train builtin:vit_cifar10 on CIFAR-10 once and cache its weights (nothing can be downloaded).

Decodes cifar10/train and cifar10/test (JPEG folders under $QCLI_SHARED_DATA, default
../shared/data) once into uint8 tensors through qcli's own image transform, trains the
builtin from its seeded random init with AdamW, linear warmup + cosine decay, label
smoothing, random crop (pad 4) and horizontal flip, and writes

    .bench-cache/vit_cifar10.pt       the state dict (load with --weights)
    .bench-cache/vit_cifar10.json     top-1 on cifar10/test (10,000 images), time, epochs

Weights that exist for the same architecture config, training options and script are
reused (the key is in the JSON). A checkpoint is written after every epoch
(.bench-cache/vit_cifar10.ckpt.pt); an interrupted run resumes from it.

    .venv/bin/python benchmarks/train_vit_cifar10.py            # 1 thread, ~70-100 min
    .venv/bin/python -m qcli eval builtin:vit_cifar10 --weights .bench-cache/vit_cifar10.pt \\
        --data ../shared/data/cifar10/test --no-latency
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from qcli.data.images import ImageTransform
from qcli.models.builtin import VIT_CIFAR10_CONFIG, build_architecture

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".bench-cache"
SPEC = "builtin:vit_cifar10"


def shared_data() -> Path:
    return Path(os.environ.get("QCLI_SHARED_DATA", REPO.parent / "shared" / "data"))


def atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def decode_split(split: str, transform: ImageTransform) -> tuple[Tensor, Tensor]:
    """All images of cifar10/SPLIT as uint8 [N, 3, 32, 32] plus int64 labels (cached)."""
    from PIL import Image

    root = shared_data() / "cifar10" / split
    h, w = transform.spec.size
    cache = CACHE / f"cifar10-{split}-{h}x{w}-u8.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        return data["x"], data["y"]
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    t0 = time.perf_counter()
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            with Image.open(path) as image:
                xs.append(transform.pixels(image))
            ys.append(label)
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
    atomic_save({"x": x, "y": y, "classes": classes}, cache)
    print(f"decoded {split}: {len(y)} images in {time.perf_counter() - t0:.0f}s", flush=True)
    return x, y


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random crop with 4 pixels of zero padding and a horizontal flip, on a uint8 batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[
        torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols
    ]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


@torch.no_grad()
def top1(model: torch.nn.Module, x: Tensor, y: Tensor, transform: ImageTransform) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), 500):
        logits = model(transform.normalize(x[i : i + 500]))
        correct += int((logits.argmax(1) == y[i : i + 500]).sum())
    model.train()
    return correct / len(y)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def cache_key(args: argparse.Namespace) -> str:
    options = {
        k: getattr(args, k)
        for k in ("epochs", "batch_size", "lr", "wd", "warmup", "smoothing", "seed")
    }
    blob = json.dumps({"arch": VIT_CIFAR10_CONFIG, "options": options}, sort_keys=True)
    script = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return hashlib.sha256((blob + script).encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup epochs")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (timing runs)")
    parser.add_argument("--out", type=Path, default=CACHE / "vit_cifar10.pt")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CACHE.mkdir(exist_ok=True)

    key = cache_key(args)
    report_path = args.out.with_suffix(".json")
    ckpt_path = args.out.with_name(args.out.stem + ".ckpt.pt")
    if not args.force and args.out.exists() and report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("key") == key:
            print(f"cached: {args.out} (top-1 {report['test_top1']:.2%}), key {key}")
            return

    arch = build_architecture(SPEC)
    model = arch.module.train()
    transform = ImageTransform(arch.input_spec)
    xtr, ytr = decode_split("train", transform)
    xte, yte = decode_split("test", transform)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = len(ytr) // args.batch_size  # drop the last partial batch
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, train_seconds, history = 0, 0.0, []
    if ckpt_path.exists() and not args.force:
        ckpt = torch.load(ckpt_path, weights_only=True)
        if ckpt["key"] == key:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            gen.set_state(ckpt["gen"])
            start_epoch, train_seconds, history = ckpt["epoch"], ckpt["seconds"], ckpt["history"]
            print(f"resuming after epoch {start_epoch} from {ckpt_path}", flush=True)

    print(
        f"{SPEC} {VIT_CIFAR10_CONFIG} params {sum(p.numel() for p in model.parameters())}; "
        f"{args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size}, "
        f"{args.threads} thread(s), key {key}",
        flush=True,
    )
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(ytr), generator=gen)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = transform.normalize(augment(xtr[idx], gen))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=args.smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
            if i % 50 == 0:
                print(
                    f"  epoch {epoch + 1} step {i}/{steps_per_epoch} loss {loss.item():.3f} "
                    f"{time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
            if args.max_steps is not None and step >= args.max_steps:
                dt = time.perf_counter() - t0
                print(
                    f"stopped after {i + 1} steps: {dt / (i + 1):.3f}s/step, "
                    f"{dt / (i + 1) * steps_per_epoch:.0f}s/epoch",
                    flush=True,
                )
                return
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        probe = top1(model, xte[::5], yte[::5], transform)  # 2,000 test images, a progress probe
        history.append(
            {
                "epoch": epoch + 1,
                "loss": loss_sum / steps_per_epoch,
                "seconds": round(seconds, 1),
                "test_top1_2k": probe,
            }
        )
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / steps_per_epoch:.3f}, "
            f"{seconds:.0f}s, top-1 on 2,000 test images {probe:.2%}",
            flush=True,
        )
        atomic_save(
            {
                "key": key,
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "epoch": epoch + 1,
                "seconds": train_seconds,
                "history": history,
            },
            ckpt_path,
        )

    model.eval()
    acc = top1(model, xte, yte, transform)
    atomic_save(model.state_dict(), args.out)
    report = {
        "model": SPEC,
        "config": VIT_CIFAR10_CONFIG,
        "input": {"mean": arch.input_spec.mean, "std": arch.input_spec.std},
        "options": {
            k: getattr(args, k)
            for k in ("epochs", "batch_size", "lr", "wd", "warmup", "smoothing", "seed", "threads")
        },
        "test_top1": acc,
        "test_images": len(yte),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": round(train_seconds / args.epochs, 1),
        "history": history,
        "key": key,
        "weights": str(args.out),
    }
    atomic_write_text(json.dumps(report, indent=2) + "\n", report_path)
    print(f"top-1 on cifar10/test ({len(yte)} images): {acc:.2%}; weights {args.out}", flush=True)


if __name__ == "__main__":
    main()
