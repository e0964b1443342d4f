"""Attach a Linux kernel host to NVMe-oF subsystems with nvme-cli (for GPU hosts that want the
kernel's block devices or ``/dev/ngXnY`` passthrough rather than the Python initiator)."""

from nvmeof.host.nvme_cli import (
    ConnectedController,
    DiscoveryRecord,
    HostError,
    KernelModuleMissing,
    NvmeCli,
    NvmeCliError,
    NvmeCliMissing,
    NvmeNamespaceDevice,
    NvmePath,
    NvmeSubsystem,
)

__all__ = [
    "ConnectedController",
    "DiscoveryRecord",
    "HostError",
    "KernelModuleMissing",
    "NvmeCli",
    "NvmeCliError",
    "NvmeCliMissing",
    "NvmeNamespaceDevice",
    "NvmePath",
    "NvmeSubsystem",
]
