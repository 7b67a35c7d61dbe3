# Trimmed from OpenDCAI/DataFlow-MM at a5d48e00d5f28952a9438803238a97870f90b772 (Apache License 2.0,
# see bench/seed_side/LICENSE) to what the video caption example uses.
