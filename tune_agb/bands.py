"""The dataset's fixed names: the band order of the input stacks (the one place that names the 14 channels) and
the splits of the tile layout ``INPUT_DIR/{train,val,test}/NAME.npy``."""

S2_BANDS: tuple[str, ...] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
S1_BANDS: tuple[str, ...] = ("VV", "VH")
BAND_NAMES: tuple[str, ...] = S2_BANDS + S1_BANDS
NUM_BANDS: int = len(BAND_NAMES)
SPLITS: tuple[str, ...] = ("train", "val", "test")
