"""napari-genseg: review and correct AI segmentations of CT with MSA²Net, MARSeg and AR-Seg."""

__version__ = "0.1.0"
