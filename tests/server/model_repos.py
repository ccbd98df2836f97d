"""Model repositories and a server serving one, for the hot-swap tests (tests/server/test_models*.py)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from server.model_repo import ModelRepository


def repo_of(root: Path, versions: dict[str, Path | bytes]) -> Path:
    """A repository folder: ``{version: model file to copy, or bytes to write as model.onnx}``."""
    for version, model in versions.items():
        (root / version).mkdir(parents=True)
        target = root / version / ("model.onnx" if isinstance(model, bytes) else f"model{model.suffix}")
        if isinstance(model, bytes):
            target.write_bytes(model)
        else:
            shutil.copyfile(model, target)
    return root


def with_class_names(model: Path, names: list[str], out: Path) -> Path:
    """A copy of an exported ONNX model whose metadata names its classes ``names``."""
    import json

    import onnx

    from engine.metadata import PREFIX

    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == PREFIX + "class_names":
            prop.value = json.dumps(names)
    onnx.save(proto, str(out))
    return out


@contextlib.asynccontextmanager
async def repo_server(root: Path, allow_class_change: bool = False, policy=None, shadow_share: float = 0.0,
                      **config) -> AsyncIterator:
    """A server on 127.0.0.1 serving the repository at ``root`` and its :class:`ModelManager`; with an
    :class:`~server.auth.AdminPolicy`, its ``ModelControl`` service too."""
    from engine.backends import load_backend
    from server.control import add_model_control
    from server.models import ModelManager, production_loader
    from server.service import InspectionServer, ServerConfig

    def load(path: Path):
        return load_backend(path, device="cpu")

    repository = ModelRepository.open(root)
    options = {"port": 0, "metrics_port": None, "max_delay_ms": 2.0, **config}
    server = InspectionServer(production_loader(repository, load), ServerConfig(**options),
                              model_version=repository.roles.production)
    manager = ModelManager(server, repository, load, allow_class_change=allow_class_change, shadow_share=shadow_share)
    if policy is not None:
        add_model_control(server, manager, policy)
    await server.start()
    try:
        yield server, manager
    finally:
        await server.stop(grace=10)
        await manager.close()
