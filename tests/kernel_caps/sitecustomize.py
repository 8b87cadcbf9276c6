"""Loaded by every Python process of the AVX2-capped test run (``make test-avx2`` puts this folder on
PYTHONPATH): vLLM's CPU wheel ships its kernels three times (``_C``: AVX-512 with BF16, ``_C_AVX512``,
``_C_AVX2``) and picks one by CPUID in ``CpuPlatform.import_kernels``, reading no variable. Here
``import vllm._C`` loads the AVX2 build instead, the library an AVX2-only CPU loads (its module is
named ``_C`` inside). torch (``ATEN_CPU_CAPABILITY``), oneDNN (``ONEDNN_MAX_CPU_ISA``) and MKL
(``MKL_ENABLE_INSTRUCTIONS``) are capped by their own variables, which the Makefile sets."""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys


class _VllmAvx2Kernels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "vllm._C" or not path:
            return None
        for folder in path:
            library = os.path.join(folder, "_C_AVX2.abi3.so")
            if os.path.exists(library):
                loader = importlib.machinery.ExtensionFileLoader(name, library)
                return importlib.util.spec_from_file_location(name, library, loader=loader)
        return None


if os.environ.get("PARALLEL_BRIDGE_KERNEL_CAP") == "avx2":
    sys.meta_path.insert(0, _VllmAvx2Kernels())
