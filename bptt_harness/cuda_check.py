"""Can the installed torch build run on this machine's NVIDIA driver? ``bptt-harness doctor`` says, and what to do.

A torch CUDA build needs a driver that supports its CUDA major version; within one major version an
older driver runs it through CUDA's minor-version compatibility. The CPU build never uses a GPU, even
where one is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

# The CUDA variants of the PyTorch wheel index (https://download.pytorch.org/whl/<variant>) that the
# Makefile's TORCH_CUDA can name, oldest first.
CUDA_VARIANTS = ("cu118", "cu126", "cu128", "cu130")


@dataclass(frozen=True)
class CudaCheck:
    ok: bool
    message: str


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0"])[:2]
    return int(parts[0]), int(parts[1])


def _variant_for(driver: tuple[int, int]) -> str | None:
    """The newest wheel variant whose CUDA version is at most the driver's."""
    fits = [v for v in CUDA_VARIANTS if _major_minor(f"{v[2:-1]}.{v[-1]}") <= driver]
    return fits[-1] if fits else None


def check_cuda_build(torch_cuda: str | None, driver: str | None, driver_cuda: int | None) -> CudaCheck:
    """``torch_cuda``: ``torch.version.cuda`` (None for the CPU build); ``driver``: the NVIDIA driver version;
    ``driver_cuda``: the newest CUDA it supports as NVML gives it (12040 for 12.4); None where no driver answers."""
    reinstall = "rm -rf .venv && make venv"
    if torch_cuda is None:
        if driver is None:
            return CudaCheck(True, "torch is the CPU build and there is no NVIDIA driver: right for this machine")
        return CudaCheck(False, f"torch is the CPU build, but NVIDIA driver {driver} is here: to use the GPU, "
                                f"install the CUDA build with: {reinstall}")
    need = _major_minor(torch_cuda)
    if driver is None or driver_cuda is None:
        return CudaCheck(True, f"torch is built for CUDA {torch_cuda}, and no NVIDIA driver answers here (a login "
                               "node?): trials run on the CPU here; run bptt-harness doctor again on a GPU node")
    have = (driver_cuda // 1000, driver_cuda % 1000 // 10)
    shown = f"{have[0]}.{have[1]}"
    if have[0] < need[0]:
        variant = _variant_for(have)
        fix = (f"or install the build for it: {reinstall} TORCH_CUDA={variant}" if variant
               else "no PyTorch CUDA build supports a driver this old")
        return CudaCheck(False, f"torch is built for CUDA {torch_cuda}, but driver {driver} supports CUDA up to "
                                f"{shown}: torch cannot use the GPU; update the driver, {fix}")
    if have < need:
        return CudaCheck(True, f"torch is built for CUDA {torch_cuda} and driver {driver} supports CUDA {shown}: it "
                               "runs through CUDA minor-version compatibility (if a kernel fails to load, update "
                               "the driver)")
    return CudaCheck(True, f"torch is built for CUDA {torch_cuda} and driver {driver} supports CUDA {shown}: ok")


def nvml_driver() -> tuple[str | None, int | None]:
    """(driver version, newest CUDA version it supports) from NVML, or (None, None) without a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: nothing to report
        return None, None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        get_cuda = getattr(pynvml, "nvmlSystemGetCudaDriverVersion_v2", None) or pynvml.nvmlSystemGetCudaDriverVersion
        return (version.decode() if isinstance(version, bytes) else str(version)), int(get_cuda())
    except Exception:  # noqa: BLE001
        return None, None
    finally:
        pynvml.nvmlShutdown()


def check_installed() -> CudaCheck:
    """The check for the torch installed in this environment on this machine's driver."""
    import torch

    driver, driver_cuda = nvml_driver()
    return check_cuda_build(torch.version.cuda, driver, driver_cuda)
