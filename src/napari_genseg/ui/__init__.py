"""napari contributions (the only package that imports napari / Qt): the Segment CT dock, the
AR-Seg explorer dock, the reader, the writer and the phantom sample. Importing it has no side
effects; see ``_triton`` for the one process-wide work-around, applied where a dock loads a model."""
