"""Records the checkpoint tensors a test's code reads (``safetensors.safe_open`` wrapped, and the token embedding's
memory map, ``shared.model.mapped.mapped_tensor``)."""

from __future__ import annotations

import pytest


class TensorReads:
    """Wraps ``safetensors.safe_open`` and records the name of every tensor read through it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors

        from shared.model import mapped

        self.real, self.keys = safetensors.safe_open, []
        monkeypatch.setattr(safetensors, "safe_open", self.open)
        real_map = mapped.mapped_tensor

        def mapped_tensor(file, key):
            tensor = real_map(file, key)
            if tensor is not None:
                self.keys.append(key)
            return tensor

        monkeypatch.setattr(mapped, "mapped_tensor", mapped_tensor)

    def open(self, *args, **kwargs):
        return _RecordingHandle(self.real(*args, **kwargs), self.keys)


class _RecordingHandle:
    def __init__(self, handle, reads: list[str]) -> None:
        self._handle, self._reads = handle, reads

    def __enter__(self):
        self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_tensor(self, name: str):
        self._reads.append(name)
        return self._handle.get_tensor(name)

    def get_slice(self, name: str):
        self._reads.append(name)
        return self._handle.get_slice(name)

    def __getattr__(self, attr: str):
        return getattr(self._handle, attr)
