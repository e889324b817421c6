"""Papermill engine ``scalecert`` (``papermill --engine scalecert``): papermill's own engine with the kernel reached
over IPC (Unix sockets in Jupyter's runtime folder) instead of TCP, so that runs print only progress and results
(ipykernel warns on every start that TCP carries the kernel's traffic unencrypted)."""

from __future__ import annotations

from jupyter_client.manager import KernelManager
from papermill.engines import NBClientEngine


class IPCKernelManager(KernelManager):
    """A kernel manager whose kernels listen on IPC sockets."""

    def __init__(self, **kwargs):
        kwargs.setdefault("transport", "ipc")
        super().__init__(**kwargs)


class QuietEngine(NBClientEngine):
    """Papermill's nbclient engine with ``IPCKernelManager``."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
        """Return what papermill's engine returns, having run the notebook on an IPC kernel."""
        kwargs.setdefault("kernel_manager_class", IPCKernelManager)
        return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
