"""Measuring tools behind ``lipsync bench``, ``lipsync profile`` and ``lipsync check``.

* :mod:`~lipsync.tools.bench` -- timing helpers and the model / end-to-end benchmarks;
* :mod:`~lipsync.tools.profile` -- one chunk under ``torch.profiler``, time by kernel class;
* :mod:`~lipsync.tools.check` -- load a preset strictly and push synthetic input through it;
* :mod:`~lipsync.tools.gpu_busy` -- the GPU's busy share (NVML) while a block runs;
* :mod:`~lipsync.tools.procs` -- free TCP ports and stopping a server process (benchmarks, tests).

They use the library like any caller (:func:`lipsync.loading.load_models`, the pipeline's public
methods); nothing in the library imports them. The one-off GPU experiments are in
``benchmarks/`` (its README says what each measures and where the results are).
"""
