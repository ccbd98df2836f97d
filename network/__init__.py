"""The segmentation network (torch): its configuration, construction, processing, checkpoints.

``network.config`` is torch-free (the trainer validates its flags with it before torch loads);
every other module imports torch at the top. ``engine`` never imports this package: its torch
backend (:mod:`network.backend`) is found through ``engine.backends``' suffix table by name.
"""
