"""Papermill engine ``scalecert`` (``papermill --engine scalecert``): papermill's own engine with the kernel's
application log at ERROR, so that runs print only progress and results (ipykernel warns on every start that TCP
carries its traffic unencrypted, which on 127.0.0.1 is expected). Cell output, warnings included, is untouched.

IPC transport would avoid the warning too, but two kernels started side by side (``make figures`` runs two
notebooks at once) then share one socket path and read each other's messages."""

from __future__ import annotations

from papermill.engines import NBClientEngine

#: appended to the kernel's command line
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


class QuietEngine(NBClientEngine):
    """Papermill's nbclient engine, the kernel started with ``KERNEL_ARGUMENTS``."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
        """Return what papermill's engine returns, having run the notebook on a kernel that logs errors only."""
        kwargs.setdefault("extra_arguments", KERNEL_ARGUMENTS)
        return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
