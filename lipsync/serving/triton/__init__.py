"""The model on Triton Inference Server (docs/TRITON.md): ``lipsync serve triton`` and the
workers' engine that talks to it.

* :mod:`~lipsync.serving.triton.protocol` -- the wire format both sides import: model and
  tensor names, faces as 8-bit levels, denoising options as JSON, the published parameters;
* :mod:`~lipsync.serving.triton.server` -- the server process: options, the models' Python side
  (:class:`~lipsync.serving.triton.server.ModelHost`, batching), starting and stopping PyTriton;
* :mod:`~lipsync.serving.triton.backend_env` -- the Triton process's ``LD_LIBRARY_PATH``;
* :mod:`~lipsync.serving.triton.client` -- :class:`~lipsync.serving.triton.client.TritonEngine`
  (a :class:`lipsync.engine.SyncEngine`), its errors, the workers' runner;
* :mod:`~lipsync.serving.triton.shm` -- the client's shared-memory regions.
"""
