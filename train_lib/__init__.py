"""The parts of the MNIST-1D dropout example that ``train.py`` (the training loop) uses.

  cli.py          the command line, generated from the Config dataclass in train.py
  data.py         MNIST-1D, generated locally; batches as a function of the step
  models.py       the linen CNN and MLP on jaxdrop.linen.Dropout; Adam
  devices.py      data parallelism: the mesh, global batches, several hosts
  evaluation.py   jitted weight-scaling and MC-dropout evaluation; keep-fraction and
                  finiteness checks
  checkpoints.py  checksummed Orbax checkpoints; a resume skips damaged ones
  workdir.py      the run directory, --resume's lookup, strict atomic JSON files
  interrupt.py    Ctrl-C stops between steps, saving where the run is
  report.py       the results table and the plots

None of it is part of the ``jaxdrop`` package; ``pip install -e ".[train]"``
installs what it needs.
"""
