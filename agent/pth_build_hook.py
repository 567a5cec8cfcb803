"""The build hook both distributions share (vramtop and vramtop-agent).

It installs `vramtop-autostart.pth` at the top of site-packages, beside the
packages, for `pip install .` and `pip install -e .` alike. The file's one
line starts the vramtop agent when VRAMTOP=1 or VRAMTOP_RECORD is set (for
launchers such as torchrun that cannot wrap the command) and does nothing
otherwise. See vramtop_agent/_autostart.py and docs/integrations.md.
"""

import os

from setuptools.command.build_py import build_py

PTH = "vramtop-autostart.pth"
PTH_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # Editable wheels are assembled from the install dir, not from build_lib.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        self.copy_file(PTH_SRC, os.path.join(target, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.append(os.path.join(self.build_lib, PTH))
        return outputs
