"""FP8 (E4M3) post-training quantization of the transformer: calibration on real trajectories, Q/DQ export."""
