"""napari contributions (the only package that imports napari / Qt).

Importing it blocks the ``triton`` package for this process unless it is already loaded (or
``GENSEG_ALLOW_TRITON=1``). Reason: timm imports torchvision, which imports ``torch._dynamo``,
which imports triton; triton's bundled LLVM crashes the process (segfault) when it is loaded after
napari has created its OpenGL canvas on a software renderer (Mesa llvmpipe, e.g. Xvfb or a
remote desktop). The plugin never uses ``torch.compile``, so nothing is lost; torch simply sees
no triton.
"""

import os as _os
import sys as _sys

if "triton" not in _sys.modules and _os.environ.get("GENSEG_ALLOW_TRITON") != "1":
    _sys.modules["triton"] = None
