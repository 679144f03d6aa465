"""One data-generation run in a fresh process, for the datagen suite's memory and speed rows.

`python datagen_worker.py SPEC_JSON` prints one JSON line: peak RSS (VmHWM) before and
after generating, seconds, and the method's metrics. A fresh process per run is what makes
the peak mean "this run".
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

from rss import peak_rss_mb  # this folder: the worker runs as a script

os.environ.setdefault("OMP_NUM_THREADS", "1")


def peak_mb() -> float:
    """Peak RSS of this address space (`rss.peak_rss_mb`), ru_maxrss where that is None."""
    peak = peak_rss_mb()
    if peak is None:  # not Linux: best effort
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def main(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from qcli.methods.registry import DATA_METHODS, load_all
    from qcli.models import ModelSource, load_model

    load_all()
    loaded = load_model(ModelSource(spec["model"], spec.get("weights")), {})
    method = DATA_METHODS[spec["method"]]
    settings = method.settings(**spec["settings"])
    warm = method.settings(**{**spec["settings"], "num_images": 2, "batch_size": 2, "iters": 1})
    method.run(loaded.module, loaded.input_spec, warm)  # lazy imports and allocator warm-up
    before = peak_mb()
    start = time.perf_counter()
    images, metrics = method.run(loaded.module, loaded.input_spec, settings)
    seconds = time.perf_counter() - start
    return {
        "peak_rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak_mb(), 1),
        "seconds": round(seconds, 2),
        "images_mb": round(images.numel() * images.element_size() / 2**20, 1),
        "metrics": metrics,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1])), default=str))
