"""Run onnxruntime's quantize_static in its own process (so a slow or memory-hungry method can
be stopped by a timeout), reporting wall time and peak memory as JSON.

usage: ort_quantize_worker.py FP32_ONNX OUT_ONNX CALIB_NPY METHOD BATCH_SIZE REPORT_JSON
"""

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, run as a script
from suites.ort_baseline import ort_quantize_static


def main(argv: list[str]) -> None:
    fp32, out, npy, method, batch, report = argv
    images = np.load(npy)
    # Equal batches: onnxruntime's histogram calibrators (Percentile, Entropy) stack per-batch
    # outputs with np.asarray and fail on a shorter last batch (100 images in batches of 32).
    bs = max(d for d in range(1, int(batch) + 1) if len(images) % d == 0)
    batches = [images[i : i + bs] for i in range(0, len(images), bs)]
    t = time.perf_counter()
    ort_quantize_static(fp32, out, batches, method=method)
    seconds = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(report, "w") as f:
        stats = {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_mb), "batch_size": bs}
        json.dump(stats, f)


if __name__ == "__main__":
    main(sys.argv[1:])
