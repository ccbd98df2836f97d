"""The camera side: the camera library (:mod:`client.camera`), ``server client`` / ``camera stream``
(:mod:`client.stream_folder`) and ``server status`` / ``camera status`` (:mod:`client.status`).

Installable with the core dependencies alone (no torch, onnxruntime, openvino or aiohttp); it
imports ``engine`` and ``protos``, never ``server``.
"""
