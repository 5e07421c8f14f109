"""Reading cases and writing results: CVPR24 and CVPR25 NPZ cases (:mod:`.npz`), medical files in their own formats
(:mod:`.medical`), atomic writes and clean interruption (:mod:`.atomic`), checks of input and output locations
(:mod:`.paths`)."""
