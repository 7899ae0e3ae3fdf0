"""The video object segmentation side around the model: data, metrics, validation, training.

``models/`` holds the networks (SST, its backbone, the streaming propagator, label propagation);
this package holds what trains and scores them, one module per concern:

- :mod:`vos.config`: the run configuration (one dataclass; defaults stated once).
- :mod:`vos.files`: the one atomic-write helper; :mod:`vos.layout`: folder layouts, image
  suffixes and mask modes; :mod:`vos.masks`: mask files.
- :mod:`vos.synthetic`, :mod:`vos.datasets`: training and validation videos.
- :mod:`vos.losses`, :mod:`vos.training`: the loss and the training loop.
- :mod:`vos.metrics`: the official DAVIS 2017 J&F; :mod:`vos.scoring`: scoring folders.
- :mod:`vos.segmenters`: the model, copy and propagation segmenters; :mod:`vos.validation`:
  the one pipeline that runs a segmenter over videos, writes and scores them (train.py's
  validation and evaluate.py both call it).
- :mod:`vos.checkpoint`: checkpoints; :mod:`vos.visualize`: overlays and GIFs.

It is not installed (``pip install -e .`` installs only ``sst_triton``): scripts and tests
import it from the repository root.
"""
