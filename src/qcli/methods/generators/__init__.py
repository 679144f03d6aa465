"""Data generators: calibration images from the model alone.

Each generator is one file that registers itself with its own settings dataclass (`noise`,
`bns`, `dgh`); `bn_stats.py` is the BatchNorm-statistics library the BN-matching ones share
and `images.py` what all of them share about images. The stage knows none of them by name.
"""
