"""The build toolchain behind the ``engine`` command: ``engine build`` (TensorRT engines, OpenVINO
IRs), ``engine info``, and the parity checks every build and export is held to.

It imports engine (the runtime it builds for) and, for ``.pt`` files, the network lazily; engine
never imports it.
"""
