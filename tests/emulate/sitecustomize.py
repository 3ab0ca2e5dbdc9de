"""Emulate a CPU without native bf16 in every Python process of a test run (pytest and each
trainer, torchrun and evaluate process it starts), on a CPU that has it:

    MNIST_DDP_EMULATE_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=tests/emulate python -m pytest

ATEN_CPU_CAPABILITY=avx2 makes torch dispatch its AVX2 kernels (torch.backends.cpu.get_cpu_capability()
then says AVX2), and this file makes torch.cpu's avx512_bf16 / AMX probes say False as they do on an
AVX2-only CPU, so precision=auto resolves to fp32 exactly as there.  It patches torch.cpu when it is
first imported, not before: processes that never import torch pay nothing.  The suite's outcome must
be the same with and without it (cnn/precision.py's rules; tests/test_precision.py)."""

import importlib.abc
import importlib.util
import os
import sys

EMULATED = os.environ.get("MNIST_DDP_EMULATE_CPU", "")


def _no_native_bf16(module) -> None:
    module._is_avx512_bf16_supported = lambda: False
    module._is_amx_tile_supported = lambda: False


class _PatchTorchCpu(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cpu":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            _no_native_bf16(module)

        spec.loader.exec_module = patched
        return spec


if EMULATED == "avx2":
    sys.meta_path.insert(0, _PatchTorchCpu())
elif EMULATED:
    raise SystemExit(f"MNIST_DDP_EMULATE_CPU={EMULATED}: only 'avx2' is emulated")
