"""Sony MCT's own data generation (the DGH authors' code), run in MCT's venv, never qcli's.

`benchmarks/.mct-venv/bin/python mct_worker.py SPEC_JSON OUT.npy` generates images with
`mct.data_generation.pytorch_data_generation_experimental` at MCT's defaults (RAdam, lr 16,
smoothing + augmentation, 32 extra pixels, all-images BN statistics, min-max output loss),
with the image count, iterations and batch size the spec gives, on the model qcli loads for
the spec, and prints one JSON line: seconds and the images' shape. The images (the model's
normalized input space) go to OUT.npy so qcli's own yardstick scores them.

The venv: `python3 -m venv benchmarks/.mct-venv && benchmarks/.mct-venv/bin/pip install
model-compression-toolkit==2.6.1`, plus a .pth file naming qcli's .venv site-packages so it
sees the same torch, timm and weights (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))


def main(spec: dict, out: Path) -> dict:
    import model_compression_toolkit as mct
    import numpy as np
    import torch
    from model_compression_toolkit.data_generation import ImageNormalizationType

    from qcli.models import ModelSource, load_model
    from qcli.quant.capture import _rewrite_modules

    torch.set_num_threads(spec.get("threads", 2))
    torch.manual_seed(spec.get("seed", 0))
    loaded = load_model(ModelSource(spec["model"], spec.get("weights")), {})
    model = loaded.module
    # MCT traces the model with torch.fx, which timm's TF-"same" convs (padding computed
    # from the input at run time) defeat: the fixed-pad rewrite qcli's capture uses, the same
    # function, numerically identical at the model's input size.
    _rewrite_modules(model, torch.zeros(1, 3, *loaded.input_spec.size))
    model.eval()
    mean = tuple(loaded.input_spec.mean)
    norm = {
        (0.5, 0.5, 0.5): ImageNormalizationType.KERAS_APPLICATIONS,
        (0.485, 0.456, 0.406): ImageNormalizationType.TORCHVISION,
    }[mean]
    config = mct.data_generation.get_pytorch_data_generation_config(
        n_iter=spec["iters"],
        data_gen_batch_size=spec["batch_size"],
        image_normalization_type=norm,
    )
    start = time.perf_counter()
    images = mct.data_generation.pytorch_data_generation_experimental(
        model=model,
        n_images=spec["num_images"],
        output_image_size=tuple(loaded.input_spec.size),
        data_generation_config=config,
    )
    seconds = time.perf_counter() - start
    stacked = torch.cat([torch.as_tensor(x).detach().cpu().float() for x in images])
    np.save(out, stacked.numpy())
    return {
        "seconds": round(seconds, 2),
        "images": int(stacked.shape[0]),
        "shape": list(stacked.shape),
        "mct_version": mct.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]), Path(sys.argv[2]))))
