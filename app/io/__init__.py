"""Reading cases and writing results: CVPR24 NPZ cases (:mod:`.npz`), atomic writes (:mod:`.atomic`)."""
